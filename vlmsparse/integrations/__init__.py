"""Integrations with other libraries: SparseLoRA as a peft LoRA layer (``peft.py``); see docs/ARCHITECTURE.md."""
