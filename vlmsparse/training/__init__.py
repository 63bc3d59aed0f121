"""training layer (see ../shared/ARCHITECTURE.md): finetuning pruned VLMs on HF Trainer.

``vlmsparse.training.finetune(model, data, output_dir, config)`` is the entry point (``finetune.py``);
``FinetuneConfig`` its configuration. Importing this package does not import transformers.
"""

from .config import FinetuneConfig
from .finetune import finetune

__all__ = ["FinetuneConfig", "finetune"]
