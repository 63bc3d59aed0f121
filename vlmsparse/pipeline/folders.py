"""Model folder to model folder: :func:`prune_folder` (an HF folder to a pruned folder: what ``vlmsparse prune``
runs), :func:`compress_folder` (an HF or pruned folder to a compressed checkpoint folder) and
:func:`decompress_folder` (back to a plain HF folder); the tokenizer / processor / mask files go along.

Layer 5 of docs/ARCHITECTURE.md, above ``compress.py`` (the format), ``save.py`` (``load_model``, which opens any of
the folders), ``prune/`` and ``stream.py``, so none of those imports another back.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import models
from .._io import write_folder_atomically
from ..data import calibration as calib
from ..masks import MaskSet
from . import prune as _prune
from . import save as _save
from . import stream as _stream
from .compress import check_min_sparsity, compress, load_compressed, write_compressed
from .guards import check_device, check_output_folder
from .save import load_model

__all__ = ["prune_folder", "compress_folder", "decompress_folder"]

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


_DTYPES = ("float32", "float16", "bfloat16")


def _check_counts(**counts: tuple[int | None, str]) -> None:
    """``ValueError`` naming the parameter for a count that is given but not an int >= 1 (``what``: what it
    counts, for the message)."""
    for name, (value, what) in counts.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be >= 1 ({what}), got {value!r}")


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: got {dtype!r}; allowed: {', '.join(_DTYPES)} (or a torch.dtype)")
    return getattr(torch, dtype)


def prune_folder(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    method: str = "wanda",
    sparsity: Any = 0.5,
    allocation: str | Mapping[str, Any] = "equal",
    vision: Any = None,
    language: Any = None,
    connector: Any = None,
    calibration: str | os.PathLike = "synthetic",
    nsamples: int = 128,
    seqlen: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_words: int | None = None,
    image_root: str | os.PathLike | None = None,
    scope: str = "auto",
    blocksize: int = 128,
    dampening: float = 0.01,
    report_error: bool = True,
    propagate: str = "pruned",
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    offload: bool = False,
    stream: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, MaskSet]:
    """Prune the Hugging Face model folder ``model`` and write the pruned folder (weights, ``sparsity_masks``,
    processor / tokenizer) to ``output``: ``(output path, masks)``. What ``vlmsparse prune`` runs; the per-layer
    report is :func:`~vlmsparse.pipeline.prune.report_of` ``(masks)``.

    What is pruned: ``method``, ``sparsity``, ``allocation``, ``scope``, ``blocksize``, ``dampening``,
    ``report_error`` and ``propagate`` as in :func:`~vlmsparse.pipeline.prune.prune_model`. ``vision`` /
    ``language`` / ``connector``: one part's pattern on top of ``allocation`` at ``sparsity`` (replacing it for
    that part, or adding the part; ``0`` leaves a part dense, and is ignored for a part the model lacks; see
    :func:`~vlmsparse.pipeline.prune.allocation_with_parts`).

    Calibration (needed by every method but magnitude, and by OWL): ``calibration`` is ``"synthetic"`` (coloured
    shapes with captions at the vision tower's image size), image-text records (a ``.json`` / ``.jsonl`` file,
    image paths relative to it or ``image_root``; an image folder with captions), ``nsamples`` of them drawn with
    ``seed``, captions cut to ``max_words``; or, for the language part alone, a text source (a ``.txt`` file, a
    folder of them, a ``datasets`` folder) cut into ``nsamples`` windows of ``seqlen`` tokens (default: the
    model's positions, at most 2048); ``batch_size`` samples per forward. See :mod:`vlmsparse.data.calibration`.

    Where: ``device`` (default cuda when available, else cpu); ``dtype`` (a torch dtype or its name) to load the
    weights in. ``offload``: the weights stay on the CPU and one block at a time visits ``device``.
    ``stream``: the model is built empty and each block's weights are read from the folder's
    safetensors when it is pruned and written to ``output`` right after (host memory: about one block; needs
    checkpoint keys equal to the model's names, as causal LMs have; one block visits ``device`` at a time, so
    ``offload`` is implied).

    Refused before the model is loaded (ValueError, FileNotFoundError, FileExistsError): an ``output`` that is,
    contains or lies inside ``model``; an existing ``output`` unless ``overwrite``; a ``model`` folder without
    config.json or weights; a bad count (``nsamples``, ``seqlen``, ``batch_size``, ``max_words`` < 1), option
    or pattern; allocation ``owl`` with a per-part pattern; an unavailable ``device``; a model folder without a
    processor or tokenizer when calibration is needed; an unreadable, empty or too short calibration source;
    and a text source for a model whose vision or connector part would be pruned (a text has no images; leave
    those parts dense at 0 or use ``allocation="language"``).

    Nothing is half-written: the output is written to a temporary sibling folder and renamed into place at the
    end, so on any failure (also during pruning) ``output`` does not exist or, with ``overwrite``, still holds
    what it held before.
    """
    check_output_folder(output, [model], overwrite)
    _save.check_model_folder(model)  # before any other work; load_model checks it again (a directory listing)
    _check_counts(nsamples=(nsamples, "calibration samples"), batch_size=(batch_size, "calibration samples per "
                  "forward"), seqlen=(seqlen, "tokens per calibration window"),
                  max_words=(max_words, "words kept per caption"))
    parts = {part: value for part, value in (("vision", vision), ("language", language), ("connector", connector))
             if value is not None}
    if parts and allocation == "owl":
        raise ValueError("allocation 'owl' cannot be combined with vision / language / connector patterns (OWL "
                         "spreads one sparsity over the layers); use allocation equal, language or vision with them")
    if parts and isinstance(allocation, Mapping):
        raise ValueError("give the per-part patterns either as the allocation mapping or as vision / language / "
                         "connector, not both")
    needs_calibration = _prune.PruneConfig(
        method=method, sparsity=sparsity, allocation=allocation, scope=scope, blocksize=blocksize,
        dampening=dampening, propagate=propagate,
    ).needs_calibration  # refuses bad options (e.g. sparsegpt with a row scope) before loading
    device = check_device(device)
    dtype = _dtype(dtype)
    processor = _save.load_processor(model)
    if needs_calibration and processor is None:
        raise ValueError(f"{model} holds no processor or tokenizer files to build calibration inputs")
    text = needs_calibration and calib.is_text_source(calibration)
    batches = samples = empty = None
    if text:  # read, tokenize and cut the windows before the model loads: bad text fails fast
        empty = _stream.empty_model(model, dtype)  # the parts a text can calibrate, checked before loading
        batches = calib.text_calibration_batches(calibration, processor, nsamples,
                                                 seqlen or calib.default_text_seqlen(model), seed, batch_size,
                                                 decoder_start_token_id=models.decoder_start_token_id(empty))
        _check_text_calibrates(calibration, empty, method, sparsity, allocation, parts)
    elif needs_calibration and str(calibration) != "synthetic":  # bad records fail before the model loads
        samples = calib.load_calibration_samples(calibration, nsamples, seed, image_root=image_root)
    if stream:
        loaded = empty if empty is not None else _stream.empty_model(model, dtype)
    else:
        loaded = _save.load_model(model, device=None if offload else device, dtype=dtype)
    allocation = _prune.allocation_with_parts(allocation, sparsity, parts, _present_parts(loaded))
    if needs_calibration and not text:
        if samples is None:  # the synthetic set, drawn at the vision tower's image size
            samples = calib.load_calibration_samples(calibration, nsamples, seed,
                                                     image_size=models.vision_image_size(loaded))
        batches = calib.build_calibration_batches(samples, processor, batch_size, max_words,
                                                  decoder_start_token_id=models.decoder_start_token_id(loaded))
    options = dict(method=method, sparsity=sparsity, allocation=allocation, calibration=batches, scope=scope,
                   blocksize=blocksize, dampening=dampening, report_error=report_error, propagate=propagate,
                   progress=progress)
    if stream:
        return _stream.prune_streamed(loaded, model, output, device=device, processor=processor,
                                     overwrite=overwrite, dtype=dtype, **options)
    masks = _prune.prune_model(loaded, device=device if offload else None, **options)
    out = _save.save_pruned(loaded, masks, output, processor=processor, overwrite=overwrite, source=model)
    return out, masks


def _present_parts(model: torch.nn.Module) -> set[str]:
    """The parts (vision, connector, language) ``model`` has."""
    return {stage.part for stage in models.get_arch_spec(model).resolve(model)}


def _check_text_calibrates(source: str | os.PathLike, model: torch.nn.Module, method: str, sparsity: Any,
                           allocation: Any, parts: dict[str, Any]) -> None:
    """ValueError when the configuration prunes a part other than language (a text source has no images to
    calibrate it with); a part left dense at 0 needs no calibration."""
    present = _present_parts(model)
    full = _prune.allocation_with_parts(allocation, sparsity, parts, present)
    pruned = _prune.PruneConfig(method=method, sparsity=sparsity, allocation=full).pruned_parts(present)
    if pruned - {"language"}:
        raise ValueError(f"calibration {str(source)!r}: a text source has no images, so it cannot calibrate the "
                         f"{', '.join(sorted(pruned - {'language'}))} part(s) of this model; use allocation "
                         "'language' (or leave those parts dense at 0), or image-text records (.json/.jsonl, an "
                         "image folder)")
