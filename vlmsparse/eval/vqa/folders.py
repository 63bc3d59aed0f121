"""Evaluate a model folder: load it with its processor, read the data file, score."""

from __future__ import annotations

import os
from typing import Any

from .rows import load_vqa_rows
from .scoring import VQAReport, evaluate_vqa

__all__ = ["evaluate_folder", "load_model_folder", "load_vqa_model"]


def evaluate_folder(model_dir: str | os.PathLike, data: str | os.PathLike, batch_size: int = 32,
                    max_new_tokens: int = 5, prompt: str | None = None, limit: int | None = None,
                    image_root: str | None = None, leave_one_out: bool = False, progress: bool = True,
                    annotations: str | os.PathLike | None = None) -> VQAReport:
    """Load a model folder (Hugging Face files; a pruned or finetuned folder loads the same way) with its
    processor and evaluate it on a data file of any format :func:`load_vqa_rows` reads (read first, so that a
    bad file fails before the model loads)."""
    rows = load_vqa_rows(data, annotations, image_root, limit)
    model, processor = load_vqa_model(model_dir)
    return evaluate_vqa(model, processor, rows, batch_size, max_new_tokens, prompt, leave_one_out, progress)


def load_vqa_model(model_dir: str | os.PathLike) -> tuple[Any, Any]:
    """:func:`load_model_folder`, refusing a folder without an image processor (ValueError)."""
    model, processor = load_model_folder(model_dir)
    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError(f"{model_dir}: no image processor saved in the folder (a VQA evaluation needs "
                         "processor_config.json / preprocessor_config.json beside the model)")
    return model, processor


def load_model_folder(model_dir: str | os.PathLike) -> tuple[Any, Any]:
    """``(model, processor)`` from a local folder saved with ``save_pretrained`` (eval mode): the model class
    chosen by its ``model_type`` (:func:`vlmsparse.pipeline.save.load_model`); the processor, else the
    tokenizer, saved beside it (None when neither is there)."""
    from ...pipeline.save import (  # not at import: the pipeline pulls in the kernels
        load_model,
        load_processor,
    )

    return load_model(model_dir), load_processor(model_dir)
