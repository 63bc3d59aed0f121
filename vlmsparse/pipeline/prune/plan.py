"""What to prune (layer 5, part of :mod:`vlmsparse.pipeline.prune`): :class:`PruneConfig` (checked in
``__post_init__``) and the plan, the target linears of each block of each stage with their pattern and scope.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...models import PARTS, ArchSpec, ResolvedStage
from ...pruning import METHODS, check_weight
from ...sparsity import SparsityPattern, parse_pattern

# allocation -> the parts it prunes at ``sparsity`` (``equal`` / ``owl``: those of them the model has)
ALLOCATION_PARTS = {"equal": ("vision", "language"), "language": ("language",), "vision": ("vision",),
                    "owl": ("vision", "language")}
ALLOCATIONS = tuple(ALLOCATION_PARTS)
SCOPES = ("auto", "row", "matrix")  # magnitude / Wanda comparison group: auto = per matrix in vision, else per row
PROPAGATIONS = ("pruned", "dense")  # which outputs of a block are the next block's calibration inputs


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    - ``method``: ``magnitude`` | ``wanda`` | ``sparsegpt``.
    - ``sparsity``: a pattern (``0.5``, ``"70%"``, ``"2:4"``) used by ``equal`` / ``language`` / ``vision`` / ``owl``.
    - ``allocation``: ``equal`` (vision and language blocks at ``sparsity``), ``language`` (language blocks only),
      ``vision`` (vision blocks only), ``owl`` (``equal`` with outlier-weighted layer-wise sparsity), or a
      mapping part -> pattern (``{"vision": 0.5, "language": 0.7}``; ``"connector"`` prunes the projector /
      Q-Former too; a part absent or at 0 is left dense).
    - ``scope``: unstructured comparison group for magnitude/Wanda: ``row``, ``matrix`` or ``auto`` (per
      matrix in the vision encoder, as the reference VLM code did, per row elsewhere). SparseGPT selects per
      column block and accepts only ``auto``.
    - ``owl``: OWL on top of the allocation (unstructured only); ``owl_lambda`` the sparsity spread around the
      target, ``owl_threshold`` the outlier factor M (score > M x mean).
    - ``blocksize``, ``dampening``: SparseGPT column block and Hessian dampening (fraction of mean diagonal).
    - ``report_error``: report each layer's reconstruction error ``||X (W - W')^T|| / ||X W^T||``: SparseGPT's
      over every calibration token (from the ``X^T X`` it keeps anyway), Wanda's and magnitude's over the first
      whole calibration sequences that hold :data:`~vlmsparse.pruning.stats.ERROR_SAMPLE_TOKENS` tokens (kept for
      it; two GEMMs per layer, 10-20% of a Wanda run on a CPU).
    - ``offload``: keep calibration activations on the CPU between blocks (``None``: when the execution device
      is an accelerator).
    - ``device``: the execution device (``"cuda"``, ``"cuda:1"``, ``"cpu"``). ``None``: run where the model is.
      Given: the weights stay where they are (e.g. the CPU, for a model larger than the GPU's memory) and each
      block is moved to ``device`` in turn for calibration and pruning, then moved back.
    - ``stack_shared``: SparseGPT prunes linears that share an input (q/k/v, gate/up) as one stacked weight.
    - ``propagate``: the next block's calibration inputs are this block's outputs ``"pruned"`` (after pruning, as
      the reference Wanda / SparseGPT scripts: two forwards per block) or ``"dense"`` (before pruning: one
      forward per block, and every block's statistics come from the dense model, each stage's inputs captured
      before any stage is pruned; llm-compressor's ``propagate_error=False``).
    - ``restore_on_error``: keep a CPU copy of each weight before it changes, to restore the model if pruning
      fails half-way (e.g. NaN activations); costs host memory of the pruned weights until the end.
    """

    method: str = "wanda"
    sparsity: Any = 0.5
    allocation: Any = "equal"
    scope: str = "auto"
    owl: bool = False
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    blocksize: int = 128
    dampening: float = 0.01
    report_error: bool = True
    offload: bool | None = None
    device: str | torch.device | None = None
    stack_shared: bool = True
    progress: bool = True
    restore_on_error: bool = True
    propagate: str = "pruned"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"PruneConfig.method: unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        if isinstance(self.allocation, str):
            if self.allocation not in ALLOCATIONS:
                raise ValueError(
                    f"PruneConfig.allocation: unknown allocation {self.allocation!r}; allowed: "
                    f"{', '.join(ALLOCATIONS)} or a mapping like {{'vision': 0.5, 'language': 0.7}}"
                )
            parse_pattern(self.sparsity)
        elif isinstance(self.allocation, Mapping):
            if not self.allocation:
                raise ValueError("PruneConfig.allocation: the per-part mapping is empty")
            for part, value in self.allocation.items():
                if part not in PARTS:
                    raise ValueError(f"PruneConfig.allocation: unknown part {part!r}; allowed: {', '.join(PARTS)}")
                parse_pattern(value)
        else:
            raise ValueError(
                f"PruneConfig.allocation must be one of {ALLOCATIONS} or a mapping part -> sparsity, got "
                f"{type(self.allocation).__name__}"
            )
        if self.scope not in SCOPES:
            raise ValueError(f"PruneConfig.scope: got {self.scope!r}; allowed: {', '.join(SCOPES)}")
        if self.method == "sparsegpt" and self.scope != "auto":
            raise ValueError(
                f"PruneConfig.scope: got {self.scope!r} with method 'sparsegpt', which chooses its mask per column "
                "block as the reference does (no row / matrix comparison group); allowed: auto"
            )
        if self.propagate not in PROPAGATIONS:
            raise ValueError(f"PruneConfig.propagate: got {self.propagate!r}; allowed: {', '.join(PROPAGATIONS)}")
        if not 0.0 <= self.owl_lambda < 0.5:
            raise ValueError(f"PruneConfig.owl_lambda: got {self.owl_lambda}; allowed: [0, 0.5)")
        if self.owl_threshold <= 0:
            raise ValueError(f"PruneConfig.owl_threshold: got {self.owl_threshold}; allowed: > 0")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"PruneConfig.blocksize: got {self.blocksize!r}; allowed: a positive int")
        if not 0.0 < self.dampening < 1.0:
            raise ValueError(f"PruneConfig.dampening: got {self.dampening}; allowed: (0, 1)")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"PruneConfig.device: got {self.device!r}; allowed: None or a device name such as "
                                 "cpu, cuda, cuda:1") from None
        if self.use_owl and any(p.is_nm for p in self.part_patterns_unchecked().values()):
            raise ValueError("PruneConfig: OWL assigns layer-wise unstructured sparsity; it does not apply to N:M")

    @property
    def use_owl(self) -> bool:
        return self.owl or self.allocation == "owl"

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning needs calibration batches: every method but magnitude, and OWL."""
        return self.method != "magnitude" or self.use_owl

    def part_patterns_unchecked(self) -> dict[str, SparsityPattern]:
        if isinstance(self.allocation, Mapping):
            return {part: parse_pattern(v) for part, v in self.allocation.items()}
        pattern = parse_pattern(self.sparsity)
        return {part: pattern for part in ALLOCATION_PARTS[self.allocation]}

    def pruned_parts(self, present: Collection[str]) -> set[str]:
        """The parts this configuration prunes in a model whose parts are ``present``: those its allocation gives
        a pattern that is not dense. A part at ``0`` (``"0"``, ``"0%"``) is left dense, so it is not pruned and
        needs no calibration inputs (e.g. no images for a vision part at 0)."""
        return {part for part, pattern in self.part_patterns_unchecked().items()
                if part in present and not _is_dense(pattern)}


def _is_dense(pattern: SparsityPattern) -> bool:
    """Whether ``pattern`` prunes nothing (unstructured at 0): such a part is left as it is."""
    return not pattern.is_nm and pattern.sparsity == 0


def allocation_with_parts(allocation: str, sparsity: Any, parts: Mapping[str, Any],
                          present: set[str]) -> str | dict[str, Any]:
    """The ``allocation`` for :func:`~vlmsparse.pipeline.prune.prune_model` with per-part patterns on top:
    ``allocation`` itself without ``parts``; else the parts of ``allocation`` (``equal``: vision and language,
    those of them in ``present``, the parts the model has; ``language`` / ``vision``: that part) at ``sparsity``,
    updated with ``parts`` (part -> pattern; a new part is added, ``0`` / ``"0"`` leaves a part dense).
    ``owl`` spreads one sparsity over the layers: with ``parts`` it is a ValueError."""
    if not parts:
        return allocation
    if allocation == "owl":
        raise ValueError("allocation 'owl' cannot be combined with per-part patterns (OWL spreads one sparsity over "
                         "the layers); use allocation equal, language or vision with them")
    if allocation not in ALLOCATION_PARTS:
        raise ValueError(f"unknown allocation {allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    out = {part: sparsity for part in ALLOCATION_PARTS[allocation] if allocation != "equal" or part in present}
    out.update(parts)
    return out


@dataclass
class _Target:
    name: str
    module: nn.Linear
    part: str
    pattern: SparsityPattern
    scope: str
    reads_tail: bool = False  # reads only the masked tail of the stage's sequence (StageSpec.masked_tail)
    checked: bool = False  # check_weight passed (weights on the meta device are checked when their block arrives)


def _plan(
    spec: ArchSpec, stages: list[ResolvedStage], cfg: PruneConfig
) -> list[tuple[ResolvedStage, list[list[_Target]]]]:
    """Per stage to visit: the target linears of each block."""
    patterns = cfg.part_patterns_unchecked()
    present = {s.part for s in stages}
    if cfg.allocation in ("equal", "owl"):  # both parts where the model has them (language-only LMs too)
        patterns = {part: p for part, p in patterns.items() if part in present}
    for part, pattern in patterns.items():
        if part not in present and not _is_dense(pattern):  # a part left at 0 needs nothing: ignored
            raise ValueError(f"{spec.name} has no {part} part to prune; its parts: {', '.join(sorted(present))}")
    explicit_connector = isinstance(cfg.allocation, Mapping) and "connector" in cfg.allocation
    plan = []
    for stage in stages:
        pattern = patterns.get(stage.part)
        if pattern is None or _is_dense(pattern):
            continue
        if not stage.spec.default and not (stage.part == "connector" and explicit_connector):
            continue
        scope = cfg.scope
        if scope == "auto":
            scope = "matrix" if stage.part == "vision" else "row"
        per_block = []
        for block_name, block in zip(stage.block_names, stage.blocks):
            targets = []
            for sub, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    name = f"{block_name}.{sub}" if sub else block_name
                    reads_tail = sub in (stage.spec.masked_tail or ())
                    targets.append(_Target(name, module, stage.part, pattern, scope, reads_tail))
            per_block.append(targets)
        if any(per_block):
            plan.append((stage, per_block))
    if not plan:
        raise ValueError("nothing to prune: every part's sparsity is 0 or absent")
    return plan


def _check_arrived(targets: list[_Target]) -> None:
    """``check_weight`` for the targets not checked up front (their weights were on the meta device)."""
    for t in targets:
        if not t.checked:
            check_weight(t.module.weight.detach(), t.pattern, t.name)
            t.checked = True
