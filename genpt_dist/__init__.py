"""genpt-dist: raw text to a trained, RL-tuned and fine-tuned GPT on Ray Train x DeepSpeed ZeRO."""

__version__ = "0.1.0"
