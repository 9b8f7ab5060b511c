"""RQ2: serving engines (merged, PEFT mixed batches, the project's batched LoRA) and the benchmark."""
