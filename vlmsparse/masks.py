"""MaskSet: the keep-masks of a pruned model, saved beside it (layer 0 of docs/ARCHITECTURE.md: torch + safetensors).

``MaskSet.masks`` maps a module name (as in ``model.named_modules()``) to a bool keep-mask ``[out, in]``
(``True`` = kept). ``patterns`` records the pattern each module was pruned to (``"0.5"``, ``"2:4"``),
``method`` the algorithm. Saved as one safetensors file with the metadata in its header; format version 2
stores each mask bit-packed (:func:`pack_bitmask`, 8 columns per byte), version 1 (still read) one uint8 per
entry.

The file is written with :func:`vlmsparse._io.atomic_write` (a temporary file renamed into place) with the
permissions a plain ``open()`` would give (``0o666 & ~umask``), not ``mkstemp``'s private ``0o600``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._io import atomic_write

__all__ = ["MaskSet", "MASKS_FILENAME", "pack_bitmask", "unpack_bitmask"]

MASKS_FILENAME = "sparsity_masks.safetensors"
FORMAT_VERSION = "2"  # bit-packed masks; "1" (one uint8 per entry) is still read
_READABLE_VERSIONS = ("1", "2")


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` bool -> ``[out, ceil(in/8)]`` uint8, bit ``j`` of byte ``b`` = column ``8b + j``
    (the last byte of a row is padded with zero bits)."""
    if mask.dim() != 2:
        raise ValueError(f"pack_bitmask: mask must be 2-D [out, in], got shape {tuple(mask.shape)}")
    rows, cols = mask.shape
    nbytes = (cols + 7) // 8
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, nbytes * 8 - cols)).reshape(rows, nbytes, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded << shifts).sum(-1, dtype=torch.uint8)


def unpack_bitmask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: ``[out, ceil(in/8)]`` uint8 -> ``[out, in]`` bool with ``in = cols``."""
    if bits.dtype != torch.uint8 or bits.dim() != 2 or bits.shape[1] != (cols + 7) // 8:
        raise ValueError(f"unpack_bitmask: expected uint8 [out, {(cols + 7) // 8}] for {cols} columns, "
                         f"got {bits.dtype} {tuple(bits.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[..., None] >> shifts) & 1).bool().reshape(bits.shape[0], bits.shape[1] * 8)[:, :cols]


@dataclass
class MaskSet:
    """Keep-masks by module name, with the pattern per module and the method that made them."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    patterns: dict[str, str] = field(default_factory=dict)
    method: str | None = None
    info: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, mask in self.masks.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"MaskSet: mask of {name!r} must be a 2-D bool tensor, got {got}")
        unknown = set(self.patterns) - set(self.masks)
        if unknown:
            raise ValueError(f"MaskSet: patterns given for modules without a mask: {sorted(unknown)[:5]}")

    def __len__(self) -> int:
        return len(self.masks)

    def __contains__(self, name: object) -> bool:
        return name in self.masks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def items(self):
        return self.masks.items()

    def sparsity(self) -> float:
        """Overall fraction of pruned entries over all masks."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(torch.count_nonzero(m)) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (a file, or a folder that gets ``sparsity_masks.safetensors``), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir() or path.suffix != ".safetensors":
            path = path / MASKS_FILENAME
        tensors = {name: pack_bitmask(mask.detach()).cpu() for name, mask in self.masks.items()}
        metadata = {
            "format": "vlmsparse.masks",
            "version": FORMAT_VERSION,
            "columns": json.dumps({name: mask.shape[1] for name, mask in self.masks.items()}),
            "patterns": json.dumps(self.patterns),
            "method": self.method or "",
            "info": json.dumps(self.info),
            "order": json.dumps(list(self.masks)),  # safetensors sorts keys; keep the model's order
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> MaskSet:
        """Read a mask set written by :meth:`save` (a file, or the folder holding it)."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / MASKS_FILENAME
        if not path.exists():
            raise FileNotFoundError(
                f"no mask file at {path}; a pruned model folder holds {MASKS_FILENAME} (prune the model first)"
            )
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != "vlmsparse.masks":
                raise ValueError(f"{path} is not a vlmsparse mask file (format={metadata.get('format')!r})")
            version = metadata.get("version")
            if version not in _READABLE_VERSIONS:
                raise ValueError(f"{path}: mask format version {version!r}; this vlmsparse reads versions "
                                 f"{', '.join(_READABLE_VERSIONS)}")
            order = json.loads(metadata.get("order", "[]")) or sorted(f.keys())
            if version == "1":  # one uint8 per entry
                masks = {name: f.get_tensor(name).bool() for name in order}
            else:  # bit-packed, the number of columns in the header
                columns = json.loads(metadata.get("columns", "{}"))
                missing = [name for name in order if name not in columns]
                if missing:
                    raise ValueError(f"{path}: no column count in the header for masks {missing[:5]}")
                masks = {name: unpack_bitmask(f.get_tensor(name), int(columns[name])) for name in order}
        return cls(
            masks=masks,
            patterns=json.loads(metadata.get("patterns", "{}")),
            method=metadata.get("method") or None,
            info=json.loads(metadata.get("info", "{}")),
        )
