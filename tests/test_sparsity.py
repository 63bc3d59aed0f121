"""Sparsity patterns, mask builders (against brute-force loops) and checkers."""

from __future__ import annotations

import itertools

import pytest
import torch

from vlmsparse.sparsity import (
    SparsityPattern,
    build_mask,
    check_pattern,
    detect_nm,
    mask_nm,
    mask_per_matrix,
    mask_per_row,
    num_pruned,
    parse_pattern,
    satisfies_nm,
    sparsity_of,
    sparsity_report,
)


@pytest.mark.parametrize(
    "text, sparsity, nm",
    [
        ("0.5", 0.5, None),
        (0.7, 0.7, None),
        (0, 0.0, None),
        ("50%", 0.5, None),
        (" 70 % ", 0.7, None),
        ("unstructured:0.7", 0.7, None),
        ("UNSTRUCTURED:60%", 0.6, None),
        ("2:4", 0.5, (2, 4)),
        ("4:8", 0.5, (4, 8)),
        (" 1 : 4 ", 0.75, (1, 4)),
        ("3:16", 1 - 3 / 16, (3, 16)),
    ],
)
def test_parse_valid(text, sparsity, nm):
    pattern = parse_pattern(text)
    assert pattern.sparsity == pytest.approx(sparsity)
    assert (pattern.n, pattern.m) == (nm or (None, None))
    assert pattern.is_nm == (nm is not None)
    assert parse_pattern(str(pattern)) == pattern  # str() round-trips


@pytest.mark.parametrize(
    "bad, words",
    [
        ("1.0", "outside [0, 1)"),
        ("100%", "outside [0, 1)"),
        (-0.1, "outside [0, 1)"),
        (1.5, "outside [0, 1)"),
        (float("nan"), "outside [0, 1)"),
        ("4:4", "N < M"),
        ("5:4", "N < M"),
        ("0:4", "N < M"),
        ("half", "not valid"),
        ("2:", "not valid"),
        ("", "not valid"),
        (True, "not valid"),
        (None, "must be a string or number"),
    ],
)
def test_parse_invalid_says_what_is_allowed(bad, words):
    with pytest.raises(ValueError) as info:
        parse_pattern(bad)
    assert words in str(info.value)
    if bad is not None:
        assert "allowed" in str(info.value)


def test_pattern_dataclass_validates():
    with pytest.raises(ValueError, match="N < M"):
        SparsityPattern.nm(4, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SparsityPattern(1.2)
    with pytest.raises(ValueError, match="together"):
        SparsityPattern(0.5, 2, None)
    with pytest.raises(ValueError, match="sparsity of 2:4"):
        SparsityPattern(0.3, 2, 4)


def _brute_keep_top(values: list[float], keep: int) -> list[bool]:
    """Keep the ``keep`` largest; among equal values the lower index wins (a plain loop)."""
    ranked = sorted(range(len(values)), key=lambda i: (-values[i], i))
    chosen = set(ranked[:keep])
    return [i in chosen for i in range(len(values))]


def _scores_with_ties(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (rows, cols), generator=g).float()  # many ties
    scores[0] = 0.0  # an all-zero row
    return scores


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.6, 0.7])
def test_mask_per_row_matches_brute_force(seed, sparsity):
    scores = _scores_with_ties(6, 20, seed)
    if seed % 2:
        scores = scores + torch.rand(6, 20, generator=torch.Generator().manual_seed(seed))
    mask = mask_per_row(scores, sparsity)
    keep = 20 - num_pruned(20, sparsity)
    expected = torch.tensor([_brute_keep_top(row.tolist(), keep) for row in scores])
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    assert (mask.sum(1) == keep).all()


@pytest.mark.parametrize("seed", range(3))
def test_mask_per_matrix_matches_brute_force(seed):
    scores = _scores_with_ties(5, 12, seed)
    mask = mask_per_matrix(scores, 0.7)
    keep = 60 - num_pruned(60, 0.7)
    expected = torch.tensor(_brute_keep_top(scores.flatten().tolist(), keep)).reshape(5, 12)
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == keep
    assert check_pattern(mask, 0.7, scope="matrix")
    assert not check_pattern(mask, 0.75, scope="matrix")


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 8), (1, 2), (5, 16)])  # pairwise ranks, kthvalue for 16
@pytest.mark.parametrize("seed", range(3))
def test_mask_nm_matches_brute_force(n, m, seed):
    scores = _scores_with_ties(4, 4 * m, seed)
    mask = mask_nm(scores, n, m)
    expected = []
    for row in scores.tolist():
        line = []
        for g in range(0, len(row), m):
            line += _brute_keep_top(row[g : g + m], n)
        expected.append(line)
    assert torch.equal(mask, torch.tensor(expected))
    assert (mask.reshape(4, -1, m).sum(-1) == n).all()
    assert satisfies_nm(mask, n, m)


def test_ties_keep_lower_index():
    scores = torch.zeros(1, 8)
    assert mask_per_row(scores, 0.5).tolist() == [[True] * 4 + [False] * 4]
    assert mask_nm(scores, 2, 4).tolist() == [[True, True, False, False] * 2]


def test_huge_finite_scores_are_not_mistaken_for_inf():
    # their sum overflows to inf: the quick finiteness check must fall back to the exact one
    scores = torch.full((2, 8), 3e38)
    scores[:, ::2] = 1e38
    assert mask_nm(scores, 2, 4).tolist() == [[False, True, False, True] * 2] * 2
    assert int(mask_per_row(scores, 0.5).sum()) == 8


def test_mask_builders_reject_bad_input():
    with pytest.raises(ValueError, match="divisible by 4"):
        mask_nm(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError, match="2-D"):
        mask_per_row(torch.rand(8), 0.5)
    with pytest.raises(ValueError, match="NaN/inf"):
        mask_per_row(torch.tensor([[1.0, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="scope"):
        build_mask(torch.rand(2, 4), 0.5, scope="column")


def test_build_mask_dispatch():
    scores = torch.rand(8, 16)
    assert torch.equal(build_mask(scores, "2:4"), mask_nm(scores, 2, 4))
    assert torch.equal(build_mask(scores, "60%"), mask_per_row(scores, 0.6))
    assert torch.equal(build_mask(scores, 0.6, scope="matrix"), mask_per_matrix(scores, 0.6))


def test_mask_is_vectorised_on_a_large_matrix():
    # 4096 x 4096 with a Python loop over columns or rows would take minutes; one sort takes well under a second.
    scores = torch.rand(1024, 4096)
    mask = mask_nm(scores, 2, 4)
    assert int(mask.sum()) == 1024 * 2048


def test_checker_and_report():
    weight = torch.randn(4, 8)
    mask = mask_nm(weight.abs(), 2, 4)
    pruned = torch.where(mask, weight, 0.0)
    assert check_pattern(pruned, "2:4") and check_pattern(pruned, "4:8")
    assert detect_nm(pruned) == "2:4"
    assert detect_nm(weight) is None
    assert not check_pattern(weight, "2:4")
    assert check_pattern(pruned, 0.5) and not check_pattern(pruned, 0.6)
    assert not check_pattern(torch.randn(4, 6), "2:4")  # 6 is not divisible by 4
    assert sparsity_of(pruned) == pytest.approx(0.5)
    assert sparsity_of(mask) == pytest.approx(0.5)
    rows = sparsity_report({"a": pruned, "b": weight})
    assert [r.name for r in rows] == ["a", "b"]
    assert rows[0].sparsity == pytest.approx(0.5) and rows[0].nm == "2:4" and rows[0].shape == (4, 8)
    assert rows[1].zeros == int((weight == 0).sum()) and rows[1].nm is None


def test_4_8_but_not_2_4():
    mask = torch.tensor([[True, True, True, False, False, False, True, False]])
    assert detect_nm(mask) == "4:8"
    assert not satisfies_nm(mask, 2, 4)


@pytest.mark.parametrize("count, sparsity", list(itertools.product([7, 10, 64, 4096], [0.5, 0.6, 0.7])))
def test_num_pruned_is_nearest(count, sparsity):
    assert abs(num_pruned(count, sparsity) - count * sparsity) <= 0.5
