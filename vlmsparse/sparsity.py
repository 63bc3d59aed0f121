"""Sparsity patterns, mask builders and checkers (layer 0 of docs/ARCHITECTURE.md: torch only).

A *pattern* is what a user types: ``0.5``, ``50%``, ``unstructured:0.7``, ``2:4``, ``4:8`` or any ``N:M``.
A *mask* is a bool tensor of the weight's shape, ``True`` where the weight is kept.

Mask builders take a score tensor ``[out, in]`` (larger = more important) and keep the best entries:

- per row (``scope="row"``): every output row keeps ``in - round(in * sparsity)`` entries (Wanda's group);
- per matrix (``scope="matrix"``): the whole matrix keeps ``numel - round(numel * sparsity)`` entries;
- N:M: every group of M consecutive input weights of a row keeps exactly N.

Ties are broken by position, deterministically: among equal scores the entry with the lower index is kept.
Everything is vectorised (one selection), no Python loop over rows or columns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "SparsityPattern",
    "parse_pattern",
    "num_pruned",
    "mask_per_row",
    "mask_per_matrix",
    "mask_nm",
    "build_mask",
    "keep_top_dim0",
    "all_finite",
    "sparsity_of",
    "satisfies_nm",
    "detect_nm",
    "check_pattern",
    "LayerSparsity",
    "sparsity_report",
]

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_KNOWN_NM = ((2, 4), (4, 8))


@dataclass(frozen=True)
class SparsityPattern:
    """A sparsity pattern: unstructured (``sparsity`` = fraction of zeros) or N:M (keep N of every M).

    For N:M, ``sparsity`` is ``1 - N/M``.
    """

    sparsity: float
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if (self.n is None) != (self.m is None):
            raise ValueError(f"SparsityPattern: n and m must be given together, got n={self.n}, m={self.m}")
        if self.n is not None:
            if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 1 or self.n < 1:
                raise ValueError(f"SparsityPattern: N:M needs integers 1 <= N < M, got {self.n}:{self.m}")
            if self.n >= self.m:
                raise ValueError(
                    f"SparsityPattern: N:M needs N < M (N kept out of every M), got {self.n}:{self.m}"
                )
            expected = 1.0 - self.n / self.m
            if abs(self.sparsity - expected) > 1e-12:
                raise ValueError(
                    f"SparsityPattern: sparsity of {self.n}:{self.m} is {expected}, got {self.sparsity}"
                )
        else:
            s = self.sparsity
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
                raise ValueError(f"SparsityPattern: sparsity must be a number in [0, 1), got {s!r}")
            if not 0.0 <= s < 1.0:
                raise ValueError(f"SparsityPattern: sparsity must be in [0, 1), got {s}")

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @classmethod
    def nm(cls, n: int, m: int) -> SparsityPattern:
        if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 1 or n >= m:
            raise ValueError(f"SparsityPattern: N:M needs integers 1 <= N < M, got {n}:{m}")
        return cls(1.0 - n / m, n, m)

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return f"{self.sparsity:g}"


def parse_pattern(value: str | float | int | SparsityPattern) -> SparsityPattern:
    """Parse what a user types into a :class:`SparsityPattern`.

    Accepted: a number in [0, 1) (``0.5``), a percentage (``50%``), ``unstructured:0.7``, ``N:M`` (``2:4``).
    Raises ``ValueError`` saying what was wrong and what is allowed.
    """
    allowed = "allowed: a fraction in [0, 1) like 0.5, a percentage like 50%, unstructured:0.7, or N:M like 2:4"
    if isinstance(value, SparsityPattern):
        return value
    if isinstance(value, bool):
        raise ValueError(f"sparsity pattern {value!r} is not valid; {allowed}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity {value!r} is outside [0, 1); {allowed}")
        return SparsityPattern(float(value))
    if not isinstance(value, str):
        raise ValueError(f"sparsity pattern must be a string or number, got {type(value).__name__}; {allowed}")
    text = value.strip().lower()
    if text.startswith("unstructured:"):
        text = text[len("unstructured:") :].strip()
    nm = _NM_RE.match(text)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if n < 1 or n >= m:
            raise ValueError(f"sparsity pattern {value!r}: N:M needs 1 <= N < M (keep N of every M); {allowed}")
        return SparsityPattern.nm(n, m)
    percent = text.endswith("%")
    number = text[:-1].strip() if percent else text
    try:
        s = float(number)
    except ValueError:
        raise ValueError(f"sparsity pattern {value!r} is not valid; {allowed}") from None
    if percent:
        s /= 100.0
    if not math.isfinite(s) or not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity {value!r} is outside [0, 1); {allowed}")
    return SparsityPattern(s)


def num_pruned(count: int, sparsity: float) -> int:
    """How many of ``count`` entries a sparsity prunes: ``round(count * sparsity)``, halves rounded up."""
    return min(count, int(math.floor(count * sparsity + 0.5 + 1e-9)))


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask keeping the ``keep`` largest entries along the last dim; ties keep the lower index."""
    size = scores.shape[-1]
    if keep <= 0 or keep >= size:
        return torch.full(scores.shape, keep > 0, dtype=torch.bool, device=scores.device)
    if size <= _PAIRWISE_UP_TO:
        return _keep_top_pairwise(scores, keep)
    # Selection, not sorting: the keep-th largest score is the threshold; everything above it is kept and,
    # among the entries equal to it, the lowest indices fill the remaining places. About 2x faster than a
    # stable sort (2048 x 8192 at 50%: 0.54 s vs 1.13 s on 2 CPU cores).
    scores = scores.float()
    threshold = torch.kthvalue(scores, size - keep + 1, dim=-1, keepdim=True).values
    above = scores > threshold
    tied = scores == threshold
    places_left = keep - above.sum(dim=-1, keepdim=True)
    if bool((tied.sum(dim=-1, keepdim=True) == places_left).all()):
        return above | tied  # no row has more ties than places: the cumulative count is not needed
    return above | (tied & (tied.cumsum(dim=-1) <= places_left))


# Groups of up to this many entries (N:M patterns) rank by pairwise comparison instead of kthvalue: 2:4 on
# 4096 x 11008 scores took 0.48 s against 2.1 s (2-core Zen 4, loaded), 4:8 1.4 s against 2.0 s.
_PAIRWISE_UP_TO = 8


def _keep_top_pairwise(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """:func:`_keep_top` for a short last dim (each entry of a group made one contiguous slab)."""
    return keep_top_dim0(scores.float().movedim(-1, 0).contiguous(), keep).movedim(0, -1)


def keep_top_dim0(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask ``[m, ...]`` keeping the ``keep`` largest of each group ``scores[:, ...]`` of a short dim 0 (N:M
    groups); ties keep the lower index. Entry i's rank is the number of entries that beat it (a larger score,
    or an equal one at a lower index): ``m (m - 1) / 2`` comparisons, no sort or selection."""
    size = scores.shape[0]
    rank = torch.zeros(scores.shape, dtype=torch.uint8, device=scores.device)
    for i in range(1, size):
        for j in range(i):
            j_wins = scores[j] >= scores[i]  # a tie goes to the lower index j
            rank[i] += j_wins
            rank[j] += ~j_wins
    return rank < keep


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN/inf. One reduction first (a finite sum means none), the
    full-size check only when the sum is not finite (NaN/inf, or an overflow of large finite values)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [out, in] tensor, got shape {tuple(scores.shape)}")
    if scores.is_floating_point() and not all_finite(scores):
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(f"scores hold {bad} NaN/inf values; cannot build a mask from them")


# select(scores [rows, cols], keep) -> bool mask of the keep largest of each row, ties kept from the lowest index
Selection = Callable[[torch.Tensor, int], torch.Tensor]


def mask_per_row(scores: torch.Tensor, sparsity: float, select: Selection | None = None) -> torch.Tensor:
    """Keep mask ``[out, in]``: every row prunes ``round(in * sparsity)`` of its lowest scores. ``select``: another
    implementation of the selection with the same result (the native CPU one), else torch's."""
    _check_scores(scores)
    pattern = parse_pattern(sparsity)
    keep = scores.shape[1] - num_pruned(scores.shape[1], pattern.sparsity)
    return (select or _keep_top)(scores, keep)


def mask_per_matrix(scores: torch.Tensor, sparsity: float, select: Selection | None = None) -> torch.Tensor:
    """Keep mask ``[out, in]``: the whole matrix prunes ``round(numel * sparsity)`` of its lowest scores
    (``select`` as in :func:`mask_per_row`)."""
    _check_scores(scores)
    pattern = parse_pattern(sparsity)
    keep = scores.numel() - num_pruned(scores.numel(), pattern.sparsity)
    return (select or _keep_top)(scores.reshape(1, -1), keep).reshape(scores.shape)


def mask_nm(scores: torch.Tensor, n: int, m: int, select: Selection | None = None) -> torch.Tensor:
    """Keep mask ``[out, in]``: in every group of ``m`` consecutive inputs of a row keep the ``n`` best (``select``
    as in :func:`mask_per_row`, given one group per row)."""
    _check_scores(scores)
    SparsityPattern.nm(n, m)
    out_features, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"{n}:{m} sparsity needs in-features divisible by {m}, got {in_features}")
    groups = scores.reshape(-1, m)
    return (select or _keep_top)(groups, n).reshape(out_features, in_features)


def build_mask(
    scores: torch.Tensor, pattern: str | float | SparsityPattern, scope: str = "row", select: Selection | None = None
) -> torch.Tensor:
    """Keep mask for ``pattern`` from ``scores`` ``[out, in]``; ``scope`` is ``row`` or ``matrix``
    for unstructured patterns (N:M is always per group of M inputs); ``select`` as in :func:`mask_per_row`."""
    pattern = parse_pattern(pattern)
    if pattern.is_nm:
        return mask_nm(scores, pattern.n, pattern.m, select)
    if scope == "row":
        return mask_per_row(scores, pattern.sparsity, select)
    if scope == "matrix":
        return mask_per_matrix(scores, pattern.sparsity, select)
    raise ValueError(f"scope must be 'row' or 'matrix', got {scope!r}")


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros (for a bool mask: fraction of ``False``)."""
    if tensor.numel() == 0:
        return 0.0
    if tensor.dtype == torch.bool:
        return 1.0 - tensor.sum().item() / tensor.numel()
    return (tensor == 0).sum().item() / tensor.numel()


def _nonzero(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.bool else tensor != 0


def satisfies_nm(tensor: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive entries along the last dim has at most ``n`` non-zeros."""
    if tensor.dim() < 1 or tensor.shape[-1] % m:
        return False
    groups = _nonzero(tensor).reshape(-1, m)
    return bool((groups.sum(dim=-1) <= n).all())


def detect_nm(tensor: torch.Tensor) -> str | None:
    """The strictest of ``2:4`` / ``4:8`` that ``tensor`` satisfies, else ``None``."""
    for n, m in _KNOWN_NM:
        if satisfies_nm(tensor, n, m):
            return f"{n}:{m}"
    return None


def check_pattern(
    tensor: torch.Tensor, pattern: str | float | SparsityPattern, scope: str = "row"
) -> bool:
    """Whether a weight or keep-mask satisfies ``pattern``.

    N:M: every group has at most N non-zeros. Unstructured: at least ``round(count * sparsity)`` zeros in
    every row (``scope="row"``) or in the whole matrix (``scope="matrix"``).
    """
    pattern = parse_pattern(pattern)
    if pattern.is_nm:
        return satisfies_nm(tensor, pattern.n, pattern.m)
    zeros = ~_nonzero(tensor)
    if scope == "matrix" or tensor.dim() < 2:
        return int(zeros.sum()) >= num_pruned(tensor.numel(), pattern.sparsity)
    if scope != "row":
        raise ValueError(f"scope must be 'row' or 'matrix', got {scope!r}")
    per_row = zeros.reshape(tensor.shape[0], -1)
    return bool((per_row.sum(dim=1) >= num_pruned(per_row.shape[1], pattern.sparsity)).all())


@dataclass(frozen=True)
class LayerSparsity:
    """One row of a sparsity report."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    nm: str | None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def sparsity_report(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[LayerSparsity]:
    """Per-tensor sparsity of named tensors (weights or keep-masks), in the order given."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    rows = []
    for name, tensor in items:
        zeros = ~_nonzero(tensor)
        rows.append(LayerSparsity(name, tuple(tensor.shape), tensor.numel(), int(zeros.sum()), detect_nm(tensor)))
    return rows
