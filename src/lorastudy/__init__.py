"""lorastudy: LoRA vs full fine-tuning — representation drift and multi-adapter serving cost."""

__version__ = "0.1.0"
