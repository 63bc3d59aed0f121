"""Finetuning pruned VLMs on HF Trainer (layer 6 of docs/ARCHITECTURE.md).

``vlmsparse.training.finetune(model, data, output_dir, config)`` is the entry point (``finetune.py``);
``FinetuneConfig`` its configuration. Importing this package does not import transformers.
"""

from .config import FinetuneConfig
from .finetune import finetune

__all__ = ["FinetuneConfig", "finetune"]
