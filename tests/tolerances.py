"""The one tolerance table, keyed by dtype.

A kernel passes when its error against a float64 reference is at most ``2 x`` the error of the torch
reference run in the same low precision, plus ``atol`` (see ``assert_close_to_reference``).
"""

from __future__ import annotations

import torch

# atol added to the 2x-reference bound; GPU fp32 uses TF32 in tl.dot, hence its own, looser entry.
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "float32-tf32": 5e-3,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def atol_for(dtype: torch.dtype, tf32: bool = False) -> float:
    if dtype == torch.float32 and tf32:
        return ATOL["float32-tf32"]
    return ATOL[dtype]


def assert_close_to_reference(
    result: torch.Tensor, low_precision_reference: torch.Tensor, exact: torch.Tensor, tf32: bool = False
) -> None:
    """``|result - exact|_max <= 2 * |low_precision_reference - exact|_max + atol(dtype)``.

    ``exact`` is the float64 result, ``low_precision_reference`` the torch reference in ``result``'s dtype.
    """
    exact = exact.double()
    err = (result.double() - exact).abs().max().item()
    ref_err = (low_precision_reference.double() - exact).abs().max().item()
    bound = 2 * ref_err + atol_for(result.dtype, tf32)
    assert err <= bound, f"max error {err:.3e} > bound {bound:.3e} (reference error {ref_err:.3e}, {result.dtype})"
