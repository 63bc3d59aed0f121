"""Model folder to model folder: :func:`compress_folder` (an HF or pruned folder to a compressed checkpoint folder)
and :func:`decompress_folder` (back to a plain HF folder); the tokenizer / processor / mask files go along.

Layer 5 of docs/ARCHITECTURE.md, above both ``compress.py`` (the format) and ``save.py`` (``load_model``, which
opens any of the folders), so neither of those imports the other back.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .._io import write_folder_atomically
from .compress import check_min_sparsity, compress, load_compressed, write_compressed
from .guards import check_output_folder
from .save import load_model

__all__ = ["compress_folder", "decompress_folder"]

logger = logging.getLogger(__name__)

_SIDE_FILES = ("tokenizer", "special_tokens_map", "processor_config", "preprocessor_config", "chat_template",
               "generation_config", "added_tokens", "vocab", "merges", "sparsity_masks")


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer / processor / generation / mask files of a model folder (not weights or config)."""
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name.startswith(_SIDE_FILES):
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    return copied


def _weight_and_mask_files(folder: Path) -> dict[str, int]:
    """``{file name: bytes on disk}`` of the weight and mask files of a model folder: every ``*.safetensors``
    (weights, shards, ``model.compressed.safetensors``, ``sparsity_masks.safetensors``) and
    ``pytorch_model*.bin``."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())
            if p.is_file() and (p.suffix == ".safetensors" or (p.name.startswith("pytorch_model")
                                                                and p.suffix == ".bin"))}


def compress_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    auto: bool = False,
    device: str | torch.device | None = None,
    tokens: Sequence[int] = (1, 512),
    min_sparsity: float = 0.25,
    overwrite: bool = False,
) -> dict:
    """Compress an HF model folder into a compressed checkpoint folder (plus its tokenizer / processor / mask
    files). ``auto``: time the 2:4 layers on ``device`` first and record which stay sparse.

    ``dst`` is written as a temporary sibling and renamed into place; an existing ``dst`` is refused unless
    ``overwrite`` (then replaced as a whole), and ``dst`` may not be, contain or lie inside ``src``.
    Returns the report: ``file_bytes`` (on-disk bytes of the weight + mask files of ``dst``, listed in
    ``compressed_files``) over ``dense_bytes`` (the same for ``src``, in ``dense_files``) is ``ratio``;
    ``tensors`` holds :func:`~vlmsparse.pipeline.compress.save_compressed`'s tensor-level report."""
    check_min_sparsity("compress_folder", min_sparsity)
    src = Path(src)
    out = check_output_folder(dst, [src], overwrite, option="overwrite=True (--overwrite)")
    plan = None
    if auto:  # time on the device with a throw-away copy; save from an untouched load (bit for bit)
        timed = load_model(src, device=device)
        plan = compress(timed, auto=True, tokens=tokens)
        del timed
    model = load_model(src)

    def write(tmp: Path) -> tuple[dict, list[str]]:
        return write_compressed(model, tmp, min_sparsity, plan), _copy_side_files(src, tmp)

    tensors, copied = write_folder_atomically(out, write)
    tensors["path"] = str(out)
    compressed_files, dense_files = _weight_and_mask_files(out), _weight_and_mask_files(src)
    file_bytes, dense_bytes = sum(compressed_files.values()), sum(dense_files.values())
    report = {
        "path": str(out),
        "compares": f"bytes on disk of the weight + mask files of the compressed folder "
                    f"({' + '.join(compressed_files)}) vs those of the input folder ({' + '.join(dense_files)})",
        "file_bytes": file_bytes,
        "dense_bytes": dense_bytes,
        "ratio": file_bytes / dense_bytes if dense_bytes else 1.0,
        "compressed_files": compressed_files,
        "dense_files": dense_files,
        "formats": tensors["formats"],
        "tensors": tensors,
        "copied": copied,
    }
    if plan is not None:
        report["plan"] = plan.to_dict()
    logger.info("compress_folder: %s: %d vs %d bytes (%.1f%%)", report["compares"], file_bytes, dense_bytes,
                100 * report["ratio"])
    return report


def decompress_folder(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """A compressed checkpoint folder back to a plain HF folder (``save_pretrained``, dense weights, plus the
    tokenizer / processor / mask files). ``dst`` is written and guarded as in :func:`compress_folder`."""
    src = Path(src)
    out = check_output_folder(dst, [src], overwrite, option="overwrite=True (--overwrite)")
    model = load_compressed(src)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        _copy_side_files(src, tmp)

    write_folder_atomically(out, write)
    return out
