"""The demo model's training loop: deterministic for a seed, loss on answers only, stops at the target."""

from __future__ import annotations

import torch

from vlmsparse.demo.pretrain import PretrainConfig, pretrain

TINY = dict(num_train=128, num_heldout=32, batch_size=16, max_steps=6, eval_every=3, warmup_steps=2)


def test_same_seed_same_weights_other_seed_differs():
    a = pretrain(PretrainConfig(**TINY), progress=False)
    b = pretrain(PretrainConfig(**TINY), progress=False)
    c = pretrain(PretrainConfig(**TINY, seed=1), progress=False)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.history == [dict(h, seconds=ha["seconds"]) for h, ha in zip(b.history, a.history)]
    assert [h["step"] for h in a.history] == [3, 6] and a.steps == 6


def test_stops_once_target_reached():
    result = pretrain(PretrainConfig(**TINY, target_accuracy=0.0), progress=False)
    assert result.steps == 3 and len(result.history) == 1
