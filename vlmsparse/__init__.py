"""vlmsparse: prune vision-language models, restore them with SparseLoRA, run 2:4 weights fast.

``import vlmsparse`` is light: it imports neither transformers nor triton, queries no device and
compiles nothing. The public names below load their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "SparsityPattern": "vlmsparse.sparsity",
    "parse_pattern": "vlmsparse.sparsity",
    "MaskSet": "vlmsparse.masks",
    "pack24": "vlmsparse.sparse24",
    "unpack24": "vlmsparse.sparse24",
    "prune_model": "vlmsparse.pipeline.prune",
    "prune_folder": "vlmsparse.pipeline.folders",
    "save_pruned": "vlmsparse.pipeline.save",
    "load_pruned": "vlmsparse.pipeline.save",
    "prune_layer": "vlmsparse.pruning",
    "SparseLoRALinear": "vlmsparse.modules.sparse_lora",
    "add_sparse_lora": "vlmsparse.pipeline.lora",
    "merge_sparse_lora": "vlmsparse.pipeline.lora",
    "remove_sparse_lora": "vlmsparse.pipeline.lora",
    "mask_gradients": "vlmsparse.pipeline.lora",
    "teacher_mode": "vlmsparse.pipeline.lora",
    "sparse_lora_config": "vlmsparse.integrations.peft",
    "save_sparse_lora": "vlmsparse.integrations.peft",
    "load_sparse_lora": "vlmsparse.integrations.peft",
    "SparseLinear": "vlmsparse.modules.sparse_linear",
    "compress": "vlmsparse.pipeline.compress",
    "save_compressed": "vlmsparse.pipeline.compress",
    "load_compressed": "vlmsparse.pipeline.compress",
    "compress_folder": "vlmsparse.pipeline.folders",
    "decompress_folder": "vlmsparse.pipeline.folders",
    "finetune": "vlmsparse.training.finetune",
    "FinetuneConfig": "vlmsparse.training.config",
    "evaluate_vqa": "vlmsparse.eval.vqa",
    "generate_answers": "vlmsparse.eval.vqa",
    "load_vqa_rows": "vlmsparse.eval.vqa",
    "write_results": "vlmsparse.eval.vqa",
    "vqa_accuracy": "vlmsparse.eval.vqa",
    "normalize_answer": "vlmsparse.eval.vqa",
    "perplexity": "vlmsparse.eval.perplexity",
    "synthetic_captions": "vlmsparse.data.synthetic",
    "run_demo": "vlmsparse.demo",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vlmsparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
