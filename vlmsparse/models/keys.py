"""Checkpoint keys as transformers renames them on load (layer 4 of docs/ARCHITECTURE.md).

transformers 5 saves some models under an older key layout (LLaVA: ``language_model.model.layers.0...``) and renames
the keys when it loads them (``model.language_model.layers.0...``). Code that reads safetensors files by parameter
name (streamed pruning, ``inspect``) maps the stored keys the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["checkpoint_key_namer"]


def checkpoint_key_namer(model: nn.Module) -> Callable[[str], str]:
    """``stored key -> the model's state-dict name`` by transformers' ``WeightRenaming`` rules for ``model``'s class
    (``model`` may be on the meta device). A key a ``WeightConverter`` would fuse, a key the rules do not turn into
    one of the model's names, and every key when transformers has no such rules keep their stored name."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        return lambda key: key
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return lambda key: key
    names = model.state_dict()
    prefix = model.base_model_prefix

    def name_of(key: str) -> str:
        renamed, _ = rename_source_key(key, renamings, [], prefix, names)
        return renamed if renamed in names else key

    return name_of
