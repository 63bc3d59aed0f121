"""Per-module sparsity report of a checkpoint on disk (``vlmsparse inspect``).

Reads a ``.safetensors`` file or a Hugging Face model folder (``model.safetensors`` or sharded with
``model.safetensors.index.json``) one tensor at a time, so a 7B checkpoint needs one weight's memory.
For each linear weight: shape, sparsity, whether it is 2:4 / 4:8, its model part when the architecture
is known (``config.json``'s ``model_type``), and, for a pruned folder with ``sparsity_masks.safetensors``,
whether the weight's non-zeros lie inside its mask.

Rows are named by module, as in ``model.named_modules()`` of the loaded model, the masks file and the prune
report. transformers 5 saves some models under a legacy key layout (LLaVA:
``language_model.model.layers.0.self_attn.q_proj.weight`` for the module
``model.language_model.layers.0.self_attn.q_proj``); the keys are renamed with transformers' own loading
rules (``conversion_mapping.get_model_conversion_mapping``) for the class the folder's ``config.json`` names.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..masks import MASKS_FILENAME, MaskSet
from ..sparsity import detect_nm

__all__ = ["InspectRow", "InspectReport", "inspect_checkpoint"]

log = logging.getLogger(__name__)

# 2-D weights that are not linear layers (token / position embeddings, T5 relative position biases).
_NOT_LINEAR = ("embed", "wte.", "wpe.", "position_embedding", "word_embeddings", "shared.weight",
               "relative_attention_bias")


@dataclass
class InspectRow:
    """One 2-D weight: ``name`` is its module's name in the loaded model (as in the masks file)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    nm: str | None
    part: str | None = None
    inside_mask: bool | None = None  # None: no mask for this weight

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class InspectReport:
    source: str
    model_type: str | None
    rows: list[InspectRow] = field(default_factory=list)
    architecture: str | None = None  # the spec's name and the blocks of each part (what a structural spec found)

    def totals(self) -> dict[str, dict[str, float]]:
        """``{part: {"numel", "zeros", "sparsity", "layers"}}`` plus ``"all"``; parts only when known."""
        groups: dict[str, list[InspectRow]] = {"all": self.rows}
        for row in self.rows:
            if row.part is not None:
                groups.setdefault(row.part, []).append(row)
        out = {}
        for part, rows in groups.items():
            numel = sum(r.numel for r in rows)
            zeros = sum(r.zeros for r in rows)
            out[part] = {"layers": len(rows), "numel": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0}
        return out

    def to_dict(self) -> dict:
        rows = []
        for row in self.rows:
            item = asdict(row)
            item["shape"] = list(row.shape)
            item["sparsity"] = row.sparsity
            rows.append(item)
        return {"source": self.source, "model_type": self.model_type, "architecture": self.architecture,
                "layers": rows, "totals": self.totals()}

    def print(self) -> None:
        """Print as a rich table (plain text when the output is not a terminal)."""
        from rich.console import Console
        from rich.table import Table

        has_masks = any(r.inside_mask is not None for r in self.rows)
        table = Table(title=f"{self.source} ({self.model_type or 'unknown architecture'})")
        for col in ["module", "part", "shape", "sparsity", "N:M"] + (["inside mask"] if has_masks else []):
            table.add_column(col, justify="right" if col in ("sparsity",) else "left")
        for r in self.rows:
            cells = [r.name, r.part or "-", "x".join(map(str, r.shape)), f"{r.sparsity:.2%}", r.nm or "-"]
            if has_masks:
                cells.append("-" if r.inside_mask is None else ("yes" if r.inside_mask else "NO"))
            table.add_row(*cells)
        console = Console()
        console.print(table)
        if self.architecture:
            console.print(f"architecture: {self.architecture}")
        totals = Table(title="totals")
        for col in ["part", "layers", "parameters", "sparsity"]:
            totals.add_column(col)
        for part, t in self.totals().items():
            totals.add_row(part, str(t["layers"]), f"{t['numel']:,}", f"{t['sparsity']:.2%}")
        console.print(totals)


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file or a model folder")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(p for p in path.glob("*.safetensors") if p.name != MASKS_FILENAME)
    if not found:
        raise FileNotFoundError(
            f"{path} holds no model.safetensors, no model.safetensors.index.json and no *.safetensors weights"
        )
    return found


def _model_type(path: Path) -> str | None:
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.exists():
        return None
    return json.loads(config.read_text()).get("model_type")


def _part_function(model_type: str | None):
    if model_type is None:
        return lambda name: None
    try:
        from ..models import part_of
    except ImportError:
        return lambda name: None

    def part(name: str) -> str | None:
        try:
            return part_of(name, model_type)
        except (KeyError, ValueError):
            return None

    return part


def _canonical(name: str) -> str:
    """A module name with its ``model`` path segments dropped: ``language_model.model.layers.0.q_proj`` (legacy
    layout) and ``model.language_model.layers.0.q_proj`` agree then. Matches a masks file written under the
    other layout (an older transformers) to the rows."""
    return ".".join(part for part in name.split(".") if part != "model")


def _checkpoint_namer(folder: Path) -> tuple[Callable[[str], str], torch.nn.Module | None]:
    """``(key -> parameter name, the model on the meta device or None)`` for the checkpoint keys of the HF folder
    ``folder`` (a name is a ``model.state_dict()`` key).

    The model class is the one ``config.json`` names (``architectures[0]``, else the class vlmsparse loads for its
    ``model_type``), built on the meta device (no memory, no weights); keys are renamed as transformers renames
    them on load (its ``WeightRenaming`` rules only: a key a ``WeightConverter`` fuses keeps its stored name,
    as its tensor is not the module's weight). Without a config or a known class, keys stay as stored.
    """
    config_path = folder / "config.json"
    if not config_path.exists():
        return (lambda key: key), None
    try:
        import transformers
        from transformers import AutoConfig

        from ..models import model_class_for
        from ..models.keys import checkpoint_key_namer

        data = json.loads(config_path.read_text())
        architectures = data.get("architectures") or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if cls is None:
            cls = model_class_for(data.get("model_type"))
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            model = cls(config)
        name_of = checkpoint_key_namer(model)
    except (ImportError, AttributeError, KeyError, ValueError, TypeError, OSError, RuntimeError) as error:
        log.warning("inspect: cannot rebuild the model class of %s (%s); rows are named by checkpoint key",
                    folder, error)
        return (lambda key: key), None
    return name_of, model


def _architecture(model: torch.nn.Module | None, model_type: str | None) -> tuple[str | None, Callable]:
    """``(description, name -> part)``: from the spec of the rebuilt (meta) model when there is one (its blocks
    as this checkpoint's config lays them out), else from ``model_type`` alone."""
    if model is not None:
        from ..models import get_arch_spec

        try:
            spec = get_arch_spec(model)
            return f"{spec.name}: {spec.describe(model)}", spec.part_of
        except ValueError as error:
            log.warning("inspect: %s", error)
            return None, lambda name: None
    part = _part_function(model_type)
    if model_type is None:
        return None, part
    from ..models import spec_for_model_type

    try:
        return spec_for_model_type(model_type).name, part
    except ValueError:
        return None, part


def _stored_tensors(path: Path, files: list[Path]) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """``(key, shape, load)`` for every tensor of the weight files, read one at a time; a compressed vlmsparse
    folder's tensors are decoded (packed 2:4, bitmask) to the dense weights they stand for."""
    from safetensors import safe_open

    from .compress import INDEX_FILENAME, iter_compressed_tensors

    if path.is_dir() and (path / INDEX_FILENAME).exists():
        yield from iter_compressed_tensors(path, aliases=False)
        return
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, tuple(f.get_slice(key).get_shape()), lambda f=f, key=key: f.get_tensor(key)


def inspect_checkpoint(path: str | os.PathLike, linear_only: bool = True) -> InspectReport:
    """Sparsity report of every linear weight (``linear_only=False``: every 2-D weight) in ``path``: a
    ``.safetensors`` file, a model folder, or a compressed vlmsparse folder (decoded tensor by tensor)."""
    from .compress import INDEX_FILENAME

    path = Path(path)
    if path.is_file() and path.name == MASKS_FILENAME:
        raise ValueError(f"{path} holds pruning masks, not weights; inspect the model folder beside it "
                         f"({path.parent}), which checks the weights against these masks")
    compressed = path.is_dir() and (path / INDEX_FILENAME).exists()
    files = [] if compressed else _weight_files(path)
    # a compressed folder stores the model's own state-dict keys; an HF folder may hold a legacy layout
    name_of, meta_model = ((lambda key: key), None) if compressed else _checkpoint_namer(
        path if path.is_dir() else path.parent)
    model_type = _model_type(path)
    architecture, part = _architecture(meta_model, model_type)
    masks_path = (path if path.is_dir() else path.parent) / MASKS_FILENAME
    masks = MaskSet.load(masks_path) if masks_path.exists() and path.is_dir() else None
    mask_by_canonical = {_canonical(name): mask for name, mask in masks.items()} if masks else {}
    report = InspectReport(str(path), model_type, architecture=architecture)
    for key, shape, load in _stored_tensors(path, files):
        if len(shape) != 2 or not key.endswith(".weight"):
            continue
        if linear_only and any(token in key for token in _NOT_LINEAR):
            continue
        name = name_of(key).removesuffix(".weight")
        tensor = load()
        nonzero = tensor != 0
        mask = masks[name] if masks and name in masks else mask_by_canonical.get(_canonical(name))
        inside = None
        if mask is not None:
            inside = mask.shape == tensor.shape and not bool((nonzero & ~mask).any())
        report.rows.append(
            InspectRow(
                name=name,
                shape=shape,
                numel=tensor.numel(),
                zeros=int((~nonzero).sum()),
                nm=detect_nm(tensor) if torch.is_floating_point(tensor) else None,
                part=part(name),
                inside_mask=inside,
            )
        )
    if not report.rows:
        kind = "linear weight" if linear_only else "2-D weight"
        raise ValueError(f"no {kind} found in {path}" + (" (linear_only=False (--all) also reports embeddings and other 2-D weights)"
                                                         if linear_only else ""))
    return report
