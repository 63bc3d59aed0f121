"""An independent sequential Wanda / SparseGPT for Llama-architecture causal LMs, vectorised, for measuring the
pipeline's perplexity against the reference recipe on a real checkpoint (``bench_prune.py --compare-reference``).

It follows the reference ``llama.py`` scripts of SparseGPT (IST-DASLab/sparsegpt) and Wanda (locuslab/wanda), and
shares no code with ``vlmsparse``:

1. the first block's input is the embedding of each calibration sequence, one sequence per forward;
2. per block: hooks gather the inputs of its linears during one forward of every sequence through the block (earlier
   blocks pruned, this one dense); every linear is pruned from those statistics; then the sequences run through the
   pruned block and its outputs are the next block's inputs.

Statistics, as the reference wrappers keep them (running means over sequences):
- Wanda: ``scaler[j] = mean over sequences of ||X_j||^2``; score ``|W| * sqrt(scaler)``; unstructured prunes the
  ``int(cols * s)`` lowest scores of each row, N:M the ``M - N`` lowest of each group of ``M`` columns.
- SparseGPT: ``H = 2/n sum X^T X``; dead inputs (``H_jj = 0``) get ``H_jj = 1`` and a zero weight column; dampening
  ``0.01 mean(diag H)``; ``U`` the upper Cholesky factor of ``H^-1``. Column blocks of 128 with lazy updates: in
  each block, the unstructured mask prunes the ``int(numel * s)`` lowest ``W^2 / U_jj^2`` of the block (taken at
  the block's start; the reference's ``<=`` threshold may take ties too), N:M picks per group of ``M`` columns when
  the loop reaches the group; each column's error ``(w - q) / U_jj`` updates the rest of the block at once and
  the columns after the block through one matrix product.

The test ``tests/test_bench_prune.py`` checks it against the float64 scalar reference of
``tests/test_pruning_reference.py`` on a tiny model.
"""

from __future__ import annotations

import torch
from torch import nn


def wanda_keep(weight: torch.Tensor, scaler: torch.Tensor, sparsity: float | None,
               nm: tuple[int, int] | None) -> torch.Tensor:
    """Keep mask ``[out, in]`` of Wanda from ``scaler [in]`` (mean squared input norm per column)."""
    score = weight.abs() * scaler.sqrt()
    pruned = torch.zeros_like(weight, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = score.reshape(weight.shape[0], -1, m)
        lowest = groups.topk(m - n, dim=-1, largest=False).indices
        pruned = pruned.reshape(groups.shape).scatter_(-1, lowest, True).reshape(weight.shape)
    else:
        order = score.sort(dim=1, stable=True).indices[:, : int(weight.shape[1] * sparsity)]
        pruned.scatter_(1, order, True)
    return ~pruned


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None,
                    nm: tuple[int, int] | None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned weight, keep mask)`` of SparseGPT for ``weight [out, in]`` and ``hessian [in, in]`` (float32 math,
    float64 for float64 inputs)."""
    compute = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for a float64 weight
    W = weight.to(compute).clone()
    H = hessian.to(compute).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows, cols = W.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for c0 in range(0, cols, blocksize):
        c1 = min(c0 + blocksize, cols)
        block, u = W[:, c0:c1].clone(), U[c0:c1, c0:c1]
        errors = torch.zeros_like(block)
        block_pruned = torch.zeros_like(block, dtype=torch.bool)
        if nm is None:
            score = block**2 / u.diagonal() ** 2
            lowest = score.flatten().sort(stable=True).indices[: int(score.numel() * sparsity)]
            block_pruned.view(-1)[lowest] = True
        for j in range(c1 - c0):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                score = block[:, j : j + m] ** 2 / u.diagonal()[j : j + m] ** 2
                block_pruned[:, j : j + m].scatter_(1, score.topk(m - n, dim=1, largest=False).indices, True)
            w = block[:, j]
            q = torch.where(block_pruned[:, j], torch.zeros_like(w), w)
            err = (w - q) / u[j, j]
            block[:, j:] -= err.unsqueeze(1) * u[j, j:].unsqueeze(0)
            block[:, j] = q
            errors[:, j] = err
        W[:, c0:c1] = block
        W[:, c1:] -= errors @ U[c0:c1, c1:]
        pruned[:, c0:c1] = block_pruned
    return W.to(weight.dtype), ~pruned


@torch.no_grad()
def sequential_prune(model, sequences: torch.Tensor, method: str, sparsity: float | None,
                     nm: tuple[int, int] | None, blocksize: int = 128,
                     propagate: str = "pruned") -> dict[str, torch.Tensor]:
    """Prune every ``nn.Linear`` of the decoder blocks of ``model`` (a ``LlamaForCausalLM``-like model with
    ``model.model.layers``, ``embed_tokens``, ``rotary_emb``) in place from ``sequences [n, seqlen]``;
    returns ``{name: keep mask}``. ``lm_head`` stays dense. ``propagate``: the next block's inputs are the
    block's outputs after pruning (``"pruned"``, as the reference scripts) or before (``"dense"``)."""
    if propagate not in ("pruned", "dense"):
        raise ValueError(f"sequential_prune: propagate must be 'pruned' or 'dense', got {propagate!r}")
    inner = model.model
    position_ids = torch.arange(sequences.shape[1], device=sequences.device).unsqueeze(0)
    hidden_states = [inner.embed_tokens(seq.unsqueeze(0)) for seq in sequences]
    rotary = inner.rotary_emb(hidden_states[0], position_ids=position_ids)

    def run(layer, hidden):  # attention_mask None: causal attention over the whole window, no padding
        out = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rotary)
        return out[0] if isinstance(out, tuple) else out

    masks = {}
    for index, layer in enumerate(inner.layers):
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        stats = {name: {"n": 0, "scaler": 0.0, "hessian": None} for name in linears}

        def gather(module, args, stat):
            x = args[0].reshape(-1, args[0].shape[-1])  # one sequence
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            n = stat["n"]
            if method == "wanda":
                stat["scaler"] = stat["scaler"] * n / (n + 1) + (x**2).sum(0) / (n + 1)
            else:
                xx = 2.0 * x.T @ x
                stat["hessian"] = xx / (n + 1) if n == 0 else stat["hessian"] * n / (n + 1) + xx / (n + 1)
            stat["n"] = n + 1

        handles = [m.register_forward_pre_hook(lambda m, a, s=stats[name]: gather(m, a, s))
                   for name, m in linears.items()]
        dense_outputs = [run(layer, hidden) for hidden in hidden_states]
        for handle in handles:
            handle.remove()
        for name, linear in linears.items():
            if method == "wanda":
                keep = wanda_keep(linear.weight, stats[name]["scaler"], sparsity, nm)
                linear.weight.mul_(keep.to(linear.weight.dtype))
            else:
                new, keep = sparsegpt_prune(linear.weight, stats[name]["hessian"], sparsity, nm, blocksize)
                linear.weight.copy_(new)
            masks[f"model.layers.{index}.{name}"] = keep
        if propagate == "dense":
            hidden_states = dense_outputs
        else:
            hidden_states = [run(layer, hidden) for hidden in hidden_states]  # through the pruned block
    return masks
