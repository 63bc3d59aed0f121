"""Compress a (merged) sparse model: 2:4 linears to :class:`SparseLinear`, compact sparse checkpoints.

- :func:`compress` swaps every eligible ``nn.Linear`` (2:4 weight, selected by ``masks`` / ``filter_fn``) for a
  :class:`~vlmsparse.modules.sparse_linear.SparseLinear`; ``auto=True`` times each distinct layer shape on the
  actual device at the given token counts and keeps 2:4 only where it is no slower than the dense matmul at any
  of them (optionally with a dense copy for the short inputs, ``dense_copy=True``).
  :func:`decompress` is the inverse swap.
- :func:`save_compressed` writes a folder: ``config.json`` (the HF config), ``model.compressed.safetensors``
  (2:4 weights as packed ``values`` + ``meta``; other sparse 2-D weights as non-zero ``values`` + ``bitmask``;
  the rest dense) and ``vlmsparse_compressed.json`` (format version, HF class, per-tensor format, sizes).
  :func:`load_compressed` rebuilds the HF model from the config (no download) and loads it bit for bit,
  dense or with ``SparseLinear`` modules (one exception: ``-0.0`` is zero, a pruned ``-0.0``, as ``w * mask``
  writes, may come back as ``+0.0``).

Bitmask format of a ``[out, in]`` tensor (:func:`vlmsparse.masks.pack_bitmask`, as in the mask file):
``bitmask [out, ceil(in/8)]`` uint8, bit ``j`` of byte ``b`` of a row is column ``8b + j``; ``values`` (1-D)
are the non-zero entries (``-0.0`` is zero; NaN is kept), in row-major order.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import ops
from .._io import write_folder_atomically
from ..bitmask import BitmaskWeight, bitmask_weight, nibble_counts
from ..kernels.timing import median_ms
from ..masks import MASKS_FILENAME, MaskSet, pack_bitmask, unpack_bitmask
from ..modules import sparse_linear
from ..modules.sparse_linear import (
    BITMASK_MIN_SPARSITY,
    SparseLinear,
    choose_backend,
    is_24,
    plan_backend,
    sparse_candidates,
    sparsity_of,
)
from ..sparse24 import Packed24, group_counts
from .guards import check_masks, check_output_folder
from .guards import model_source_dirs as _source_dirs

__all__ = [
    "FORMAT_VERSION",
    "LayerDecision",
    "CompressReport",
    "compress",
    "decompress",
    "save_compressed",
    "load_compressed",
    "pack_bitmask",
    "unpack_bitmask",
    "load_compressed_state_dict",
    "iter_compressed_tensors",
    "write_compressed",
    "check_min_sparsity",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
WEIGHTS_FILENAME = "model.compressed.safetensors"
INDEX_FILENAME = "vlmsparse_compressed.json"
CONFIG_FILENAME = "config.json"
# On a CPU, ``auto=True`` times each layer over copies of it, this many bytes in all (at most COLD_COPIES of them),
# taken in turn: one weight timed alone is read from the cache after the first call, which decode never does (a
# model's weights exceed the last-level cache). SmolLM2-135M's k_proj (576 -> 192, fp32, 2 threads, one token):
# dense 0.010 ms, packed 2:4 0.012 timed hot (kept dense); 0.035-0.051 and 0.020-0.024 over copies.
COLD_BYTES = 128 << 20
COLD_COPIES = 256


# ---------------------------------------------------------------------------------------------- swapping
@dataclass(frozen=True)
class LayerDecision:
    """What :func:`compress` did with one linear: ``backend`` is ``torch24`` / ``packed24`` / ``bitmask`` (swapped) or
    ``dense`` (left as it was), ``dense_below`` the token count under which the swapped layer runs its dense
    copy (0: none). When measured (``auto``): ``dense_ms`` / ``sparse_ms`` summed over the token counts (the
    chosen path, or the fastest compressed one when dense was kept) and ``times_ms[backend][tokens]``."""

    name: str
    shape: tuple[int, int]
    backend: str
    reason: str
    dense_ms: float | None = None
    sparse_ms: float | None = None
    dense_below: int = 0
    times_ms: dict | None = None


@dataclass
class CompressReport:
    """``layers``: one decision per eligible linear; ``not_24``: the selected linears left alone because their
    weight is not 2:4."""

    layers: list[LayerDecision] = field(default_factory=list)
    not_24: list[str] = field(default_factory=list)

    @property
    def swapped(self) -> list[str]:
        return [d.name for d in self.layers if d.backend != "dense"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.layers:
            out[d.backend] = out.get(d.backend, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"counts": self.counts(), "layers": [asdict(d) for d in self.layers]}


def _mask_is_24(mask: torch.Tensor) -> bool:
    return mask.dim() == 2 and mask.shape[1] % 4 == 0 and bool((group_counts(mask) <= 2).all())


def compress(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    auto: bool = False,
    backend: str = "auto",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    tokens: Sequence[int] = (1, 512),
    progress: bool = True,
    dense_copy: bool = False,
    plan: Mapping[str, tuple[str, int]] | None = None,
) -> CompressReport:
    """Swap every eligible ``nn.Linear`` of ``model`` (in place) for a :class:`SparseLinear`.

    Eligible: a 2:4 weight (:func:`~vlmsparse.modules.sparse_linear.is_24`), or, for ``auto`` / ``bitmask``, a
    weight at least ``BITMASK_MIN_SPARSITY`` sparse; named in ``masks`` when ``masks`` (a ``MaskSet`` or
    ``{name: bool mask}``) is given, and passing ``filter_fn(module, name)``.
    ``backend``: ``auto`` (:func:`~vlmsparse.modules.sparse_linear.choose_backend`: on a GPU today's shipped
    measurements keep every layer dense; on a CPU with the native kernels packed 2:4 or bitmask), ``torch24``,
    ``packed24`` (also on CPU), ``bitmask`` or ``dense``.

    ``auto=True`` measures instead: for each distinct (shape, dtype, bias) it times dense and every candidate (the
    compressed backends available here for ``backend="auto"``, else the named one) at ``tokens`` rows of input and
    picks by :func:`~vlmsparse.modules.sparse_linear.plan_backend`: never a path slower than dense at one of the
    token counts, the lowest summed time among the rest. On a CPU each timed call reads the next of
    :func:`_cold_copies` (weights not in the cache, as in decode), and ``tokens=(1,)`` asks for the decode path;
    the default ``(1, 512)`` also asks that prefill be no slower. ``dense_copy=True`` also allows a layer to keep
    its dense weight beside the compressed one and dispatch per call on the token count (``dense_below``; 25/16 of
    the dense fp16 bytes instead of 9/16), which is what pays where the sparse path only wins for long inputs.
    ``plan``: ``{name: (backend, dense_below)}`` decided earlier (a stored report), applied as given.
    Returns a :class:`CompressReport` with one row per eligible linear; logs a warning saying why when it swaps
    nothing.
    """
    report = _swap_linears(model, masks, auto, backend, filter_fn, tokens, progress, dense_copy, plan)
    if not report.swapped:
        logger.warning("compress: no linear was swapped for SparseLinear: %s", _why_nothing_swapped(report, backend))
    return report


def _why_nothing_swapped(report: CompressReport, backend: str) -> str:
    """Why ``report`` swaps nothing, in words (for the warnings of :func:`compress` and :func:`load_compressed`)."""
    if not report.layers and not report.not_24:
        return "no nn.Linear passed the selection (masks / filter_fn)"
    why = []
    if report.not_24:
        sparse_enough = "" if backend in ("torch24", "packed24") else f", nor {BITMASK_MIN_SPARSITY:.0%} sparse"
        why.append(f"{len(report.not_24)} selected linears are not 2:4 (more than 2 non-zeros in a group of 4 "
                   f"consecutive inputs, or in-features not divisible by 4){sparse_enough}, e.g. {report.not_24[0]}")
    if report.layers:
        reasons = "; ".join(sorted({d.reason for d in report.layers}))
        hint = ("; backend='packed24' (2:4 weights) or 'bitmask' swaps them on any device" if backend == "auto"
                else "")
        why.append(f"{len(report.layers)} sparse linears stay dense with backend {backend!r}: {reasons}{hint}")
    return "; ".join(why)


def _swap_linears(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, auto: bool, backend: str,
                  filter_fn: Callable[[nn.Module, str], bool] | None, tokens: Sequence[int],
                  progress: bool, dense_copy: bool = False,
                  plan: Mapping[str, tuple[str, int]] | None = None) -> CompressReport:
    """:func:`compress` without its warning."""
    from tqdm.auto import tqdm

    if masks is not None and hasattr(masks, "masks"):
        masks = masks.masks
    if auto and (not tokens or any(int(t) < 1 for t in tokens)):
        raise ValueError(f"compress: tokens must be positive counts, got {tokens!r}")
    candidates = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        if masks is not None and name not in masks:
            continue
        candidates.append((name, module))
    report = CompressReport()
    timings: dict[tuple, dict[str, dict[int, float]]] = {}
    for name, module in tqdm(candidates, desc="compress", disable=not progress or len(candidates) < 8):
        weight = module.weight.detach()
        shape = tuple(weight.shape)
        if not is_24(weight):
            if masks is not None and _mask_is_24(masks[name]):
                raise ValueError(f"compress: {name} has a 2:4 mask but its weight is not 2:4 (merge first?)")
            if backend in ("torch24", "packed24") or sparsity_of(weight) < BITMASK_MIN_SPARSITY:
                report.not_24.append(name)
                continue
        if plan is not None and name in plan:
            chosen, below = plan[name]
            reason, times = "planned", None
        elif auto and _timed_backends(weight, backend):
            names = _timed_backends(weight, backend)
            key = (shape, weight.dtype, module.bias is not None, tuple(names))
            if key not in timings:
                timings[key] = _time_candidates(module, names, tokens)
            times = timings[key]
            chosen, below, reason = plan_backend(times, dense_copy)
        else:
            (chosen, reason), below, times = choose_backend(weight, backend), 0, None
        dense_ms = sparse_ms = None
        if times is not None:
            dense_ms = sum(times["dense"].values())
            sparse_ms = _chosen_ms(times, chosen, below)
        if chosen == "dense":
            report.layers.append(LayerDecision(name, shape, "dense", reason, dense_ms, sparse_ms, 0, times))
            continue
        model.set_submodule(name, SparseLinear(weight, module.bias, chosen, below))
        report.layers.append(LayerDecision(name, shape, chosen, reason, dense_ms, sparse_ms, below, times))
    logger.info("compress: %s", report.counts())
    return report


def _timed_backends(weight: torch.Tensor, backend: str) -> list[str]:
    """The compressed backends ``auto=True`` times against dense: those available here for ``"auto"``, else the
    named one (none for ``"dense"``)."""
    if backend == "auto":
        return list(sparse_candidates(weight))
    chosen = choose_backend(weight, backend)[0]
    return [] if chosen == "dense" else [chosen]


def _chosen_ms(times: Mapping[str, Mapping[int, float]], chosen: str, below: int) -> float | None:
    """Summed ms of the chosen path (dense under ``below``), or of the fastest compressed one when dense won."""
    dense = times["dense"]
    if chosen == "dense":
        sparse = [sum(v.values()) for k, v in times.items() if k != "dense"]
        return min(sparse) if sparse else None
    return sum(dense[t] if t < below else times[chosen][t] for t in dense)


@torch.no_grad()
def _time_candidates(dense: nn.Linear, names: Sequence[str], tokens: Iterable[int]) -> dict[str, dict[int, float]]:
    """``{backend: {tokens: median ms}}`` of the dense layer and of a :class:`SparseLinear` per backend in
    ``names``, on inputs of ``tokens`` rows (one layer built per backend, timed side by side; on a CPU each call
    takes the next of :func:`_cold_copies`)."""
    device, dtype = dense.weight.device, dense.weight.dtype
    layers: dict[str, nn.Module] = {"dense": dense}
    for name in names:
        layers[name] = SparseLinear(dense.weight, dense.bias, name)
    # on CUDA triton's do_bench clears the L2 cache before each call
    turns = {name: itertools.cycle(_cold_copies(layer) if device.type == "cpu" else [layer])
             for name, layer in layers.items()}
    times: dict[str, dict[int, float]] = {name: {} for name in layers}
    for t in tokens:
        x = torch.randn(int(t), dense.in_features, device=device, dtype=dtype)
        for name, turn in turns.items():
            times[name][int(t)] = median_ms(lambda x=x, turn=turn: next(turn)(x), device)
    return times


def _cold_copies(layer: nn.Module) -> list[nn.Module]:
    """``layer`` and copies of it, :data:`COLD_BYTES` of parameters and buffers in all (at least ``layer``, at most
    :data:`COLD_COPIES` layers)."""
    nbytes = sum(t.numel() * t.element_size() for t in itertools.chain(layer.parameters(), layer.buffers()))
    count = min(COLD_COPIES, max(1, -(-COLD_BYTES // max(nbytes, 1))))
    return [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]


def _can_hold(weight: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` is one of the fast compressed paths for ``weight`` on its device (a plan measured on
    another machine is not applied where its backend would be a slow fallback)."""
    return backend in sparse_candidates(weight.detach())


def decompress(model: nn.Module) -> int:
    """The inverse of :func:`compress`: every ``SparseLinear`` back to an ``nn.Linear``. Returns the count."""
    names = [name for name, module in model.named_modules() if isinstance(module, SparseLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_linear())
    return len(names)


# ---------------------------------------------------------------------------------------------- formats
def _state_to_store(model: nn.Module) -> dict[str, torch.Tensor | Packed24 | BitmaskWeight]:
    """The model's state dict with every ``SparseLinear`` given back as ``weight`` (+ ``bias``): its compressed form
    (:meth:`SparseLinear.stored_weight`) where it has one, else its dense weight."""
    sparse = {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    state = {}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in sparse:
            continue
        state[key] = value
    for name, module in sparse.items():
        prefix = f"{name}." if name else ""
        stored = module.stored_weight()
        state[prefix + "weight"] = stored if stored is not None else module.dense_weight()
        if module.bias is not None:
            state[prefix + "bias"] = module.bias
    return state


def check_min_sparsity(caller: str, min_sparsity: float) -> None:
    """ValueError naming ``caller`` unless ``0 <= min_sparsity <= 1`` (the zero fraction a weight needs to be
    stored as values + bitmask)."""
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"{caller}: min_sparsity must be in [0, 1], got {min_sparsity}")


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    min_sparsity: float = 0.25,
    plan: CompressReport | None = None,
    overwrite: bool = False,
    processor: Any = None,
    masks: MaskSet | None = None,
) -> dict:
    """Save ``model`` (an HF ``PreTrainedModel``, dense or compressed) as a compressed checkpoint folder, with
    ``processor`` (``save_pretrained``) and ``masks`` (``sparsity_masks.safetensors``) when given, as
    :func:`~vlmsparse.pipeline.save.save_pruned` does: without them the folder cannot be finetuned, evaluated
    or checked by ``inspect``. From a saved folder, :func:`vlmsparse.pipeline.folders.compress_folder` copies
    both itself.

    2-D floating tensors that are 2:4 go to the packed format, other 2-D floating tensors with at least
    ``min_sparsity`` zeros to values + bitmask (when that is smaller), the rest stay dense. Tied tensors are
    stored once. ``plan`` (the report of ``compress(..., auto=True)``) is stored and makes
    ``load_compressed(as_sparse=True)`` swap only the layers it kept sparse.

    The folder is written as a temporary sibling and renamed into place (files follow the umask); an existing
    ``path`` other than an empty folder is refused unless ``overwrite`` (then replaced as a whole, no stale
    files left beside), and so is the folder the model was loaded from: the guard of
    :func:`vlmsparse.pipeline.save.save_pruned`.
    Returns the size report (also stored in the index): ``stored_bytes`` (tensor bytes written) over
    ``dense_bytes`` (the same tensors dense) is ``ratio``; ``file_bytes`` is the weights file on disk.
    """
    check_min_sparsity("save_compressed", min_sparsity)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise ValueError("save_compressed needs a Hugging Face model (with .config) to rebuild it on load")
    out = check_output_folder(path, _source_dirs(model), overwrite, option="overwrite=True", allow_empty=True)
    if masks is not None:
        check_masks(model, masks)

    def write(tmp: Path) -> dict:
        report = write_compressed(model, tmp, min_sparsity, plan)
        if masks is not None:
            masks.save(tmp / MASKS_FILENAME)
        if processor is not None:
            processor.save_pretrained(tmp)
        return report

    report = write_folder_atomically(out, write)
    report["path"] = str(out)
    logger.info("save_compressed: %d tensor bytes, %.1f%% of %d dense tensor bytes, in %s", report["stored_bytes"],
                100 * report["ratio"], report["dense_bytes"], out)
    return report


def write_compressed(model: nn.Module, path: Path, min_sparsity: float, plan: CompressReport | None) -> dict:
    """Write the files of :func:`save_compressed` (weights, config, index) into the existing folder ``path`` (a
    staging folder: no guards, no atomic rename); returns the size report without ``path``."""
    from safetensors.torch import save_file

    config = model.config
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    dense_bytes = 0
    for key, value in _state_to_store(model).items():
        if isinstance(value, (Packed24, BitmaskWeight)):
            stored = _stored_as(value, min_sparsity)
            if stored is not None:  # a SparseLinear's buffers, written as they are (no unpack, no repack)
                entry = {"format": stored, "shape": list(value.shape),
                         "dtype": str(value.values.dtype).replace("torch.", "")}
                dense_bytes += value.shape[0] * value.shape[1] * value.values.element_size()
                if stored == "packed24":
                    tensors[f"{key}.values"] = value.values.detach().cpu()
                    tensors[f"{key}.meta"] = value.meta.detach().cpu()
                else:  # the entries without the padding, in storage of their own (safetensors refuses shared)
                    tensors[f"{key}.values"] = value.values.detach()[: int(value.row_offsets[-1])].cpu().clone()
                    tensors[f"{key}.bitmask"] = value.bitmask.detach().cpu()
                entries[key] = entry
                continue
            value = ops.unpack_weight(value)
        value = value.detach().cpu()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
                 value.dtype)
        if value.numel() and ident in seen:
            entries[key] = {"format": "alias", "of": seen[ident]}
            continue
        seen[ident] = key
        nbytes = value.numel() * value.element_size()
        dense_bytes += nbytes
        entry = {"format": "dense", "shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
        if value.dim() == 2 and value.is_floating_point() and value.numel():
            if is_24(value):
                packed = ops.pack24_weight(value)
                tensors[f"{key}.values"], tensors[f"{key}.meta"] = packed.values, packed.meta
                entries[key] = {**entry, "format": "packed24"}
                continue
            nonzero = value != 0
            kept = int(nonzero.sum())
            bitmask_bytes = kept * value.element_size() + value.shape[0] * ((value.shape[1] + 7) // 8)
            if 1.0 - kept / value.numel() >= min_sparsity and bitmask_bytes < nbytes:
                tensors[f"{key}.values"] = value[nonzero].contiguous()
                tensors[f"{key}.bitmask"] = pack_bitmask(nonzero)
                entries[key] = {**entry, "format": "bitmask"}
                continue
        tensors[key] = value.contiguous()
        entries[key] = entry
    weights_path = path / WEIGHTS_FILENAME
    save_file(tensors, weights_path, metadata={"format": "vlmsparse-compressed", "format_version": FORMAT_VERSION})
    (path / CONFIG_FILENAME).write_text(config.to_json_string(), encoding="utf-8")
    formats: dict[str, int] = {}
    for entry in entries.values():
        formats[entry["format"]] = formats.get(entry["format"], 0) + 1
    stored_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    report = {
        "compares": f"tensor bytes stored in {WEIGHTS_FILENAME} vs the same tensors dense (file headers and "
                    "other files left out)",
        "stored_bytes": stored_bytes,
        "dense_bytes": dense_bytes,
        "ratio": stored_bytes / dense_bytes if dense_bytes else 1.0,
        "file_bytes": os.path.getsize(weights_path),
        "formats": formats,
    }
    index = {
        "format": "vlmsparse-compressed",
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "weights": WEIGHTS_FILENAME,
        "size": dict(report),
        "plan": plan.to_dict() if plan is not None else None,
        "tensors": entries,
    }
    (path / INDEX_FILENAME).write_text(json.dumps(index, indent=1), encoding="utf-8")
    return report


def _stored_as(stored: Packed24 | BitmaskWeight, min_sparsity: float) -> str | None:
    """The format :func:`write_compressed` gives a compressed weight's dense form when that is the format it has
    (``"packed24"`` / ``"bitmask"``), else None (the dense weight then goes the dense way): a packed 2:4 weight is
    2:4; a bitmask one is stored as such unless it is 2:4, under ``min_sparsity`` or no smaller than dense."""
    if isinstance(stored, Packed24):
        return "packed24"
    out_features, in_features = stored.shape
    kept = int(stored.row_offsets[-1])
    element = stored.values.element_size()
    nibbles = nibble_counts(stored.bitmask) if in_features % 4 == 0 else None
    if nibbles is not None and bool(((nibbles & 0x0F) <= 2).all()) and bool(((nibbles >> 4) <= 2).all()):
        return None  # 2:4 (at most 2 of each group of 4 inputs stored): packed instead
    if 1.0 - kept / max(out_features * in_features, 1) < min_sparsity:
        return None
    if kept * element + stored.bitmask.numel() >= out_features * in_features * element:
        return None
    return "bitmask"



def _read_index(path: Path) -> dict:
    index_path = path / INDEX_FILENAME
    if not index_path.is_file():
        raise FileNotFoundError(f"{path} is not a compressed vlmsparse checkpoint (no {INDEX_FILENAME})")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    version = str(index.get("format_version"))
    if index.get("format") != "vlmsparse-compressed" or version != FORMAT_VERSION:
        raise ValueError(f"{index_path}: format {index.get('format')!r} version {version!r} is not supported "
                         f"(this vlmsparse reads vlmsparse-compressed version {FORMAT_VERSION})")
    return index


def _stored_sparse(stored, key: str, entry: dict) -> Packed24 | BitmaskWeight:
    """The compressed form of the packed 2:4 or bitmask tensor ``key`` of an open safetensors file."""
    if entry["format"] == "packed24":
        return Packed24(stored.get_tensor(f"{key}.values"), stored.get_tensor(f"{key}.meta"), entry["shape"][1])
    return bitmask_weight(stored.get_tensor(f"{key}.values"), stored.get_tensor(f"{key}.bitmask"), entry["shape"][1])


def iter_compressed_tensors(path: str | os.PathLike, aliases: bool = True,
                            ) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """``(key, shape, load)`` for every tensor stored in a compressed checkpoint folder, in stored order;
    ``load()`` reads and decodes that tensor alone (dense, bit for bit), so a caller holds one at a time.
    Aliases (tied tensors) are yielded under their own key and load the tensor they alias; ``aliases=False``
    leaves them out (each stored tensor once, as ``save_pretrained`` stores tied weights)."""
    from safetensors import safe_open

    path = Path(path)
    index = _read_index(path)
    entries = index["tensors"]
    with safe_open(str(path / index["weights"]), framework="pt") as stored:

        def load(key: str) -> torch.Tensor:
            entry = entries[key]
            fmt = entry["format"]
            if fmt == "alias":
                return load(entry["of"])
            if fmt == "dense":
                return stored.get_tensor(key)
            if fmt in ("packed24", "bitmask"):
                return ops.unpack_weight(_stored_sparse(stored, key, entry))
            raise ValueError(f"{path}: tensor {key!r} has unknown format {fmt!r}")

        for key, entry in entries.items():
            if entry["format"] == "alias" and not aliases:
                continue
            shape = tuple(entries[entry["of"]]["shape"] if entry["format"] == "alias" else entry["shape"])
            yield key, shape, lambda key=key: load(key)


def load_compressed_state_dict(path: str | os.PathLike, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The dense state dict stored in a compressed checkpoint folder (tied tensors share storage); the keys in
    ``skip`` (and the aliases of those keys) are neither read nor returned."""
    skip = set(skip)
    state: dict[str, torch.Tensor] = {}
    aliases = {}
    index = _read_index(Path(path))
    for key, _, load in iter_compressed_tensors(path):
        entry = index["tensors"][key]
        if key in skip:
            continue
        if entry["format"] == "alias":
            aliases[key] = entry["of"]
        else:
            state[key] = load()
    for key, original in aliases.items():
        if original not in skip:
            state[key] = state[original]
    return state


def load_compressed(
    path: str | os.PathLike,
    as_sparse: bool = False,
    backend: str = "auto",
    device: str | torch.device | None = None,
) -> nn.Module:
    """Rebuild the Hugging Face model saved by :func:`save_compressed` (from its ``config.json``; nothing is
    downloaded) with the stored weights, bit for bit, moved to ``device``. ``as_sparse``: swap the linears
    stored as 2:4 or bitmask (only those the stored ``auto`` plan kept sparse, if there is one) for :class:`SparseLinear`
    (``backend`` as in :func:`compress`). A linear that keeps its stored format there (on a CPU with the native
    kernels) is built from the stored parts, never unpacked: loading holds the compressed bytes, not the dense ones."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    index = _read_index(path)
    entries = index["tensors"]
    cls = getattr(transformers, index["model_class"], None)
    if cls is None:
        raise ValueError(f"{path}: model class {index['model_class']!r} is not in this transformers version")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, until the state is assigned
        model = cls(config)
    sparse: dict[str, str] = {}  # module name -> key of its weight, stored packed 2:4 or bitmask
    plan: dict[str, dict] | None = None
    direct: dict[str, tuple[Packed24 | BitmaskWeight, str, int]] = {}  # built from the stored parts
    if as_sparse:
        sparse = {key[: -len(".weight")]: key for key, e in entries.items()
                  if e["format"] in ("packed24", "bitmask") and key.endswith(".weight")}
        if index.get("plan"):
            plan = {layer["name"]: layer for layer in index["plan"]["layers"]}
            sparse = {name: key for name, key in sparse.items() if name in plan and plan[name]["backend"] != "dense"}
        direct = _stored_linears(model, path, index, sparse, plan, backend, device)
    state = load_compressed_state_dict(path, skip=[sparse[name] for name in direct])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in missing if not (key.endswith(".weight") and key[: -len(".weight")] in direct)]
    if unexpected or missing:
        raise ValueError(f"{path}: checkpoint does not match {index['model_class']}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    for name, (stored, chosen, below) in direct.items():  # before the move: their linears' weights are on meta
        model.set_submodule(name, SparseLinear(stored, model.get_submodule(name).bias, chosen, below))
    if device is not None:
        model.to(device)
    rest = set(sparse) - set(direct)
    if as_sparse and (rest or not direct):
        planned = None
        if plan is not None and backend == "auto":  # the measured decisions, where this device can hold them
            planned = {name: (plan[name]["backend"], int(plan[name].get("dense_below", 0))) for name in rest
                       if _can_hold(model.get_submodule(name).weight, plan[name]["backend"])}
        report = _swap_linears(model, None, False, backend, lambda _m, name: name in rest, (1,), False,
                               plan=planned)
        if not report.swapped and not direct:
            why = _why_nothing_swapped(report, backend) if sparse else "no weight is stored as packed 2:4 or bitmask"
            logger.warning("load_compressed(as_sparse=True): none of the %d sparse layers was swapped for SparseLinear "
                           "(backend %r on %s): %s", len(sparse), backend, device or "cpu", why)
    return model


def _stored_linears(model: nn.Module, path: Path, index: dict, sparse: Mapping[str, str],
                    plan: Mapping[str, dict] | None, backend: str, device: str | torch.device | None,
                    ) -> dict[str, tuple[Packed24 | BitmaskWeight, str, int]]:
    """``{name: (stored parts, backend, dense_below)}`` of the linears in ``sparse`` whose ``SparseLinear`` keeps
    the stored format: on a CPU with the native kernels for the dtype, where the (planned) backend is ``"auto"`` or
    that format, and a bitmask weight is at least ``BITMASK_MIN_SPARSITY`` sparse. It is what
    :func:`_swap_linears` would choose from the unpacked weight there; the others take that path."""
    from safetensors import safe_open

    if device is not None and torch.device(device).type != "cpu":
        return {}
    entries = index["tensors"]
    aliased = {e["of"] for e in entries.values() if e["format"] == "alias"}
    direct = {}
    with safe_open(str(path / index["weights"]), framework="pt") as stored:
        for name, key in sparse.items():
            entry, module = entries[key], model.get_submodule(name)
            if type(module) is not nn.Linear or key in aliased or list(module.weight.shape) != entry["shape"]:
                continue
            dtype = getattr(torch, entry["dtype"])
            if not sparse_linear.native_cpu_support(torch.empty(0, dtype=dtype))[0]:
                continue
            wanted, below = backend, 0
            if plan is not None and backend == "auto":
                wanted, below = plan[name]["backend"], int(plan[name].get("dense_below", 0))
            if wanted not in ("auto", entry["format"]):
                continue
            parts = _stored_sparse(stored, key, entry)
            if isinstance(parts, BitmaskWeight):
                kept = int(parts.row_offsets[-1])
                if 1.0 - kept / max(entry["shape"][0] * entry["shape"][1], 1) < BITMASK_MIN_SPARSITY:
                    continue
            direct[name] = (parts, entry["format"], below)
    return direct
