"""Save a pruned model folder (HF ``save_pretrained`` files + ``sparsity_masks.safetensors`` + processor) and
load it back.

The folder is written to a temporary sibling and renamed into place, so a crash never leaves a half-written
model; an existing folder (other than an empty one) is replaced only with ``overwrite=True``, and the folder
the model was loaded from is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import write_folder_atomically
from ..masks import MASKS_FILENAME, MaskSet
from ..models import model_class_for
from .compress import INDEX_FILENAME, load_compressed
from .guards import check_masks, check_output_folder, model_source_dirs

__all__ = [
    "save_pruned",
    "load_pruned",
    "load_model",
    "load_processor",
    "transformers_bars_off",
    "check_masks",
    "check_output_folder",
]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' own progress bars (weight loading, shard writing) off inside, as they were after: the CLI
    commands and the demo draw one bar per stage of their own, and these would print inside them."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def save_pruned(
    model: nn.Module,
    masks: MaskSet,
    out_dir: str | os.PathLike,
    processor: Any = None,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` (``save_pretrained``), ``masks`` and ``processor`` (if given) to ``out_dir`` atomically
    (a temporary sibling folder renamed into place).

    Refuses to write into the folder the model came from (``source`` or the model's ``name_or_path``) and,
    unless ``overwrite`` (then the folder is replaced as a whole), into an existing path other than an empty
    folder: the same guard as :func:`vlmsparse.pipeline.compress.save_compressed`.
    """
    sources = model_source_dirs(model) + ([Path(source).resolve()] if source else [])
    out = check_output_folder(out_dir, sources, overwrite, option="overwrite=True", allow_empty=True)
    check_masks(model, masks)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        masks.save(tmp / MASKS_FILENAME)
        if processor is not None:
            processor.save_pretrained(tmp)

    write_folder_atomically(out, write)
    log.info("saved pruned model (%d masks, sparsity %.4f) to %s", len(masks), masks.sparsity(), out)
    return out


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def check_model_folder(model_dir: str | os.PathLike) -> Path:
    """``model_dir`` as a Path after checking that it is a folder with ``config.json`` and model weights
    (``model.safetensors``, shards with their index, ``pytorch_model.bin`` or a vlmsparse compressed checkpoint;
    the masks file alone is not weights); FileNotFoundError naming what is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} does not exist")
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} holds no config.json; not a Hugging Face model folder")
    names = [p.name for p in model_dir.iterdir() if p.is_file()]
    skip = {MASKS_FILENAME, "trainable.safetensors"}
    if INDEX_FILENAME not in names and not any(n.endswith(_WEIGHT_SUFFIXES) and n not in skip for n in names):
        raise FileNotFoundError(f"{model_dir} holds config.json but no model weights (model.safetensors, "
                                "model-*-of-*.safetensors with model.safetensors.index.json, or pytorch_model.bin)")
    return model_dir


def load_model(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a Hugging Face model of a supported architecture from a local folder (by its config's model_type);
    a folder written by :func:`vlmsparse.pipeline.compress.save_compressed` is loaded dense with its
    stored weights."""
    path = check_model_folder(path)
    config = path / "config.json"
    if (path / INDEX_FILENAME).exists():
        model = load_compressed(path)
        if dtype is not None:
            model = model.to(dtype)
    else:
        model_type = json.loads(config.read_text()).get("model_type")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = model_class_for(model_type).from_pretrained(str(path), **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


# names (prefixes) of the files a saved tokenizer consists of: a folder holding none has no tokenizer
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece", "sentencepiece")


def load_processor(path: str | os.PathLike) -> Any:
    """The processor saved in a model folder (``AutoProcessor``), else its tokenizer, else ``None``: also for a
    folder without tokenizer files (``tokenizer*``, ``vocab*``, ``merges*``, ``spiece*``, ...), where transformers
    would build an empty tokenizer from the config alone (BLIP-2's ``GPT2Tokenizer`` of 0 words)."""
    from transformers import AutoProcessor, AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any(f.is_file() and f.name.startswith(_TOKENIZER_FILES) for f in folder.iterdir()):
        log.debug("%s holds no tokenizer files: no processor", path)
        return None
    for loader in (AutoProcessor, AutoTokenizer):
        try:
            return loader.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.debug("%s.from_pretrained(%s) failed: %s", loader.__name__, path, error)
    return None


def load_pruned(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[nn.Module, MaskSet]:
    """Load a folder written by :func:`save_pruned`: ``(model, masks)``; checks masks against the weights."""
    model = load_model(path, device, dtype)
    masks = MaskSet.load(path)
    check_masks(model, masks)
    return model, masks
