"""vllm.config.PoolerConfig (the fields lorastudy sets)."""

from dataclasses import dataclass


@dataclass
class PoolerConfig:
    seq_pooling_type: str | None = None
    use_activation: bool | None = None
