"""Adapters on a built model: LoRA (lora.py) and what is built on it (the TiF few-shot learner)."""
