"""Calibration statistics of a linear layer's inputs (layer 3: tensors only).

For inputs ``X`` (``n`` real tokens x ``in`` features) a :class:`InputStats` accumulates

- ``sum_sq[j] = sum_t X[t, j]^2``    (Wanda's ``||X_j||_2^2``; the diagonal of ``gram`` when that is kept),
- ``gram = X^T X``                   (only with ``hessian=True``; SparseGPT's Hessian is ``2 X^T X / n``),
- ``count = n``,
- ``sample``: the first whole sequences (``x``'s rows ``x[i]``, real tokens only; single tokens for a 2-D ``x``)
  until it holds at least ``sample_tokens`` tokens, as given (only with ``sample_tokens > 0``), for the
  reconstruction error of a layer pruned without ``X^T X`` (Wanda, magnitude).

``token_mask`` (``[...]``, the leading dims of ``x``; True / 1 = real token) drops padding positions, so
padding never changes the statistics. Linears that read the same input share one object.
"""

from __future__ import annotations

import torch

from ..kernels.cpu_gemm import gram_add_, linear

__all__ = ["InputStats", "ERROR_SAMPLE_TOKENS"]

# Tokens (at least; in whole sequences) a layer's reconstruction error is measured on when no X^T X is kept (Wanda,
# magnitude). The Gram matrix this replaced cost in^2 x n per layer, as much as the calibration forwards (and 4 in^2
# bytes: 485 MB for a 7B down_proj). SmolLM2-135M, Wanda 2:4, 32 x 128 tokens, 2 CPU cores, in-process, without ->
# with the report: Gram fp32 5.5-5.8 -> 9.0-10.6 s, bf16 4.1-4.3 -> 7.5-7.8 s; two GEMMs over 1024 tokens fp32
# 5.3-5.7 -> 6.6-6.8 s, bf16 3.5-3.6 -> 4.1-4.4 s. Whole sequences because a sequence's first tokens carry outlier
# activations that dominate some layers' errors: against the error over all tokens (max over the 210 linears, bf16
# 2:4; windows of 128 / 512 / 2048 tokens), the first 1024 tokens were off by 7% / 17% / 32% (half a 2048-token
# window holds its first token twice as often as the data), tokens spread over the batches (never a sequence's
# first) by up to 16-66x, whole sequences by 7% / 17% / 6% (median 0.6-1.0%; the 17%: two 512-token windows).
ERROR_SAMPLE_TOKENS = 1024


def _square_sums(flat: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``sum_t flat[t, j]^2``, float64 ``[in]`` on ``device``: the native CPU op for float32 / bfloat16 inputs on a
    CPU when the extension is built, else torch's float32 sum. SmolLM2-135M, Wanda 2:4, bf16, 2 threads, Intel Xeon:
    the 480 batches' statistics took 0.25 s with torch (a float32 copy, its square, the sum), 0.09 s native."""
    if flat.device.type == "cpu" and device.type == "cpu" and flat.dtype in (torch.float32, torch.bfloat16):
        from ..kernels import cpu  # loads the extension: only once CPU statistics are asked for

        if cpu.native_available():
            return cpu.column_square_sums(flat)
    return flat.to(device=device, dtype=torch.float32).square().sum(dim=0).to(torch.float64)


class InputStats:
    """Accumulated input statistics of one linear layer (or of several that read the same input)."""

    def __init__(self, in_features: int, hessian: bool = False, device: torch.device | str | None = None,
                 sample_tokens: int = 0) -> None:
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"InputStats: in_features must be a positive int, got {in_features!r}")
        if not isinstance(sample_tokens, int) or sample_tokens < 0:
            raise ValueError(f"InputStats: sample_tokens must be an int >= 0, got {sample_tokens!r}")
        self.in_features = in_features
        self.sample_tokens = sample_tokens
        self._sample_parts: list[torch.Tensor] = []
        self._sampled = 0
        self.device = torch.device(device) if device is not None else None
        self.count = 0
        self.sum_sq: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.with_hessian = bool(hessian)

    def _alloc(self, device: torch.device) -> None:
        dev = self.device or device
        self.sum_sq = torch.zeros(self.in_features, dtype=torch.float64, device=dev)
        if self.with_hessian:
            self.gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=dev)

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add inputs ``x`` ``[..., in]``; ``token_mask`` ``[...]`` (bool or 0/1) keeps only real tokens."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"InputStats: inputs have {x.shape[-1]} features, expected {self.in_features}")
        flat = x.reshape(-1, self.in_features)
        if token_mask is not None and tuple(token_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"InputStats: token_mask shape {tuple(token_mask.shape)} must equal the inputs' leading "
                             f"dims {tuple(x.shape[:-1])}")
        if self._sampled < self.sample_tokens:
            self._add_sample(x, token_mask)
        if token_mask is not None:
            real = token_mask.reshape(-1).to(device=flat.device).bool()
            if not bool(real.all()):  # no padding (text windows): no copy (0.2-0.3 ms per [1024, 576-1536] bf16)
                flat = flat[real]
        if self.sum_sq is None:
            self._alloc(flat.device)
        if flat.shape[0] == 0:
            return
        if self.gram is not None:  # sum of squares = diag(X^T X): one product gives both
            gram_add_(self.gram, flat.to(device=self.gram.device, dtype=torch.float32))
            batch_sq = self.gram.diagonal()
        else:
            batch_sq = _square_sums(flat, self.sum_sq.device)
        if not bool(torch.isfinite(batch_sq).all()):  # any NaN/inf input makes its column's sum non-finite
            bad = int((~torch.isfinite(flat)).sum())
            raise ValueError(f"InputStats: calibration activations hold {bad} NaN/inf values")
        if self.gram is None:
            self.sum_sq += batch_sq
        self.count += flat.shape[0]

    def _add_sample(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        """Whole sequences of ``x`` (its rows; tokens of a 2-D ``x``), real tokens only, copied, until the sample
        holds ``sample_tokens``."""
        device = self.device or x.device
        if x.dim() < 3:
            flat = x.reshape(-1, self.in_features)
            if token_mask is not None:
                flat = flat[token_mask.reshape(-1).to(flat.device).bool()]
            part = flat[: self.sample_tokens - self._sampled].to(device, copy=True)
            self._sample_parts.append(part)
            self._sampled += part.shape[0]
            return
        sequences = x.reshape(-1, x.shape[-2], self.in_features)
        masks = None if token_mask is None else token_mask.reshape(sequences.shape[:2]).to(x.device).bool()
        for i in range(sequences.shape[0]):
            if self._sampled >= self.sample_tokens:
                break
            part = (sequences[i] if masks is None else sequences[i][masks[i]]).to(device, copy=True)
            self._sample_parts.append(part)
            self._sampled += part.shape[0]

    @property
    def sample(self) -> torch.Tensor | None:
        """The sampled tokens ``[s, in]`` in the inputs' dtype (see the module docstring), None without any."""
        if not self._sample_parts:
            return None
        if len(self._sample_parts) > 1:
            self._sample_parts = [torch.cat(self._sample_parts)]
        return self._sample_parts[0]

    def _check(self) -> None:
        if self.count == 0:
            raise ValueError("InputStats: no calibration tokens were added (empty set or all padding)")

    @property
    def norm(self) -> torch.Tensor:
        """Root mean square of each input feature, ``[in]`` float32 (Wanda's ``||X_j||_2`` up to a constant)."""
        self._check()
        sum_sq = self.gram.diagonal().to(torch.float64) if self.gram is not None else self.sum_sq
        return (sum_sq / self.count).sqrt().float()

    def hessian(self) -> torch.Tensor:
        """``H = 2 X^T X / n`` ``[in, in]`` float32 (a new tensor)."""
        self._check()
        if self.gram is None:
            raise ValueError("InputStats: created with hessian=False; SparseGPT needs hessian=True")
        return self.gram * (2.0 / self.count)

    def reconstruction_error(self, dense: torch.Tensor, pruned: torch.Tensor) -> float | None:
        """``||X W^T - X W'^T||_F / ||X W^T||_F`` with ``D = W - W'``: over every accumulated token from the Gram
        matrix where it is kept (``||X D^T||^2 = sum(D * (D @ X^T X))``, float32), else over the ``sample`` (``X D^T``
        and ``X W^T`` in the inputs' dtype, their squares summed in float32); None with neither."""
        if self.count == 0 or (self.gram is None and self.sample is None):
            return None
        if self.gram is not None:
            gram = self.gram
            dense = dense.to(gram.device, torch.float32)
            delta = dense - pruned.to(gram.device, torch.float32)
            num = (delta * linear(delta, gram)).sum().clamp_min(0)  # gram is symmetric: linear(D, G) = D @ G
            den = (dense * linear(dense, gram)).sum()
        else:  # GEMMs in the inputs' dtype, as the model's forward runs them (bf16: 1.3-1.9x faster than fp32 here)
            x = self.sample
            delta = dense.to(x.device, torch.float32) - pruned.to(x.device, torch.float32)
            num = linear(x, delta.to(x.dtype)).float().square().sum()
            den = linear(x, dense.to(x.device, x.dtype)).float().square().sum()
        if float(den) <= 0:
            return 0.0 if float(num) == 0 else float("inf")
        return float((num / den).sqrt())
