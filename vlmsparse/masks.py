"""MaskSet: the keep-masks of a pruned model, saved beside it (layer 0: torch + safetensors).

``MaskSet.masks`` maps a module name (as in ``model.named_modules()``) to a bool keep-mask ``[out, in]``
(``True`` = kept). ``patterns`` records the pattern each module was pruned to (``"0.5"``, ``"2:4"``),
``method`` the algorithm. Saved as one safetensors file (masks as uint8) with the metadata in its header.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["MaskSet", "MASKS_FILENAME", "atomic_write"]

MASKS_FILENAME = "sparsity_masks.safetensors"
FORMAT_VERSION = "1"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` to write a temporary file beside ``path``, then rename it onto ``path``,
    so that ``path`` is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (a file, or a folder that gets ``sparsity_masks.safetensors``), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir() or path.suffix != ".safetensors":
            path = path / MASKS_FILENAME
        tensors = {name: mask.detach().to("cpu", torch.uint8).contiguous() for name, mask in self.masks.items()}
        metadata = {
            "format": "vlmsparse.masks",
            "version": FORMAT_VERSION,
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
            if metadata.get("version") != FORMAT_VERSION:
                raise ValueError(
                    f"{path}: mask format version {metadata.get('version')!r}; this vlmsparse reads {FORMAT_VERSION!r}"
                )
            order = json.loads(metadata.get("order", "[]")) or sorted(f.keys())
            masks = {name: f.get_tensor(name).bool() for name in order}
        return cls(
            masks=masks,
            patterns=json.loads(metadata.get("patterns", "{}")),
            method=metadata.get("method") or None,
            info=json.loads(metadata.get("info", "{}")),
        )
