"""Streamed pruning (layer 5): a model folder pruned with about one block's weights in host memory at a time.

The model is built on the meta device (:func:`empty_model`: parameters without storage, buffers real). During
:func:`~vlmsparse.pipeline.prune.prune_model` each module's tensors are read from the folder's safetensors files
when it arrives on the execution device (:class:`StreamedWeights`) and dropped when it leaves; a block whose weights
changed (it was pruned) is first written to the output folder, and read from there if a later stage's capture runs
it again. At the end the tensors no block changed are copied from the source files, with an index, the config, the
masks and the processor; the folder appears atomically.

Host memory: one block (read, pruned, written) and the masks (one byte per pruned weight), plus the calibration
activations. Stored keys are matched to the model's parameter names as transformers renames them on load
(:func:`vlmsparse.models.keys.checkpoint_key_namer`: LLaVA and Mllama are saved under older names); the output
keeps the stored names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import write_folder_atomically
from ..masks import MASKS_FILENAME, MaskSet
from ..models import model_class_for
from ..models.keys import checkpoint_key_namer
from .prune import prune_model
from .save import check_model_folder, check_output_folder

__all__ = ["StreamedWeights", "empty_model", "prune_streamed"]

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
META = torch.device("meta")


def _source_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file of ``folder`` (one ``model.safetensors`` or shards with their index)."""
    from safetensors import safe_open

    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise ValueError(f"{folder}: streaming reads safetensors weights (model.safetensors or shards with "
                         f"{INDEX_NAME}); found neither")
    with safe_open(str(single), framework="pt") as f:
        return {key: single for key in f.keys()}


def empty_model(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of ``folder``'s config with its parameters on the meta device (no storage) and real buffers,
    tied as ``from_pretrained`` ties them (an LM head tied to the embedding is stored once, under one name)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    folder = check_model_folder(folder)
    config = AutoConfig.from_pretrained(str(folder))
    cls = model_class_for(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    model.tie_weights()  # _from_config leaves tied parameters apart; from_pretrained ties them after loading
    return model.eval()


class StreamedWeights:
    """The weights of ``model`` (built by :func:`empty_model`) in ``source``'s safetensors files; pruned blocks
    written to ``out`` (``pruned-NNNNN.safetensors``). A :class:`~vlmsparse.pipeline.prune.WeightSource`.

    Tied parameters (one tensor under several names) are loaded once, under the name the checkpoint holds, and
    put in every slot. ``dtype``: floating tensors are cast to it as they are read."""

    def __init__(self, model: nn.Module, source: str | os.PathLike, out: str | os.PathLike,
                 dtype: torch.dtype | None = None) -> None:
        self.source = Path(source)
        self.out = Path(out)
        self.dtype = dtype
        self.files = _source_files(self.source)
        self.written: dict[str, Path] = {}  # checkpoint key -> output file holding its changed value
        self.unit_files: dict[int, Path] = {}
        self.versions: dict[str, int] = {}  # checkpoint key -> version counter when loaded
        self.slots: dict[str, list[tuple[nn.Module, str]]] = {}  # checkpoint key -> (module, parameter name)
        self.key_of: dict[tuple[int, str], str] = {}
        # the model's names of the stored keys (transformers renames some layouts on load, e.g. LLaVA's)
        name_of = checkpoint_key_namer(model)
        self.stored_key = {name_of(key): key for key in self.files}
        names_of: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for module_name, module in model.named_modules():
            for name, p in module._parameters.items():
                if p is not None:
                    full = f"{module_name}.{name}" if module_name else name
                    names_of.setdefault(id(p), []).append((full, module, name))
        missing = []
        for entries in names_of.values():
            key = next((self.stored_key[full] for full, _, _ in entries if full in self.stored_key), None)
            if key is None:
                missing.append(entries[0][0])
                continue
            self.slots[key] = [(module, name) for _, module, name in entries]
            for _, module, name in entries:
                self.key_of[(id(module), name)] = key
        self._read_buffers(model)
        if missing:
            raise ValueError(f"{self.source}: streaming reads each parameter by its name, and {len(missing)} are not "
                             f"in the safetensors files (e.g. {', '.join(missing[:3])}), also under transformers' "
                             "renamings of older layouts: load the model and prune with a device instead")

    def _read_buffers(self, model: nn.Module) -> None:
        """Buffers are built real (small: rotary tables, position ids); those the checkpoint holds are read now."""
        from safetensors import safe_open

        for module_name, module in model.named_modules():
            for name, buffer in module._buffers.items():
                key = self.stored_key.get(f"{module_name}.{name}" if module_name else name)
                if buffer is not None and key is not None:
                    with safe_open(str(self.files[key]), framework="pt", device="cpu") as f:
                        module._buffers[name] = f.get_tensor(key)

    def _keys(self, module: nn.Module, recurse: bool) -> list[str]:
        keys = []
        for m in module.modules() if recurse else (module,):
            for name, p in m._parameters.items():
                key = self.key_of.get((id(m), name))
                if p is not None and key is not None and key not in keys:
                    keys.append(key)
        return keys

    def _set(self, key: str, tensor: torch.Tensor) -> None:
        param = nn.Parameter(tensor, requires_grad=False)
        for module, name in self.slots[key]:
            module._parameters[name] = param

    @staticmethod
    def _move_buffers(module: nn.Module, device: torch.device, recurse: bool) -> None:
        for m in module.modules() if recurse else (module,):
            for name, buffer in m._buffers.items():
                if buffer is not None:
                    m._buffers[name] = buffer.to(device)

    def load(self, module: nn.Module, device: torch.device, recurse: bool) -> None:
        from safetensors import safe_open

        self._move_buffers(module, device, recurse)
        by_file: dict[Path, list[str]] = {}
        for key in self._keys(module, recurse):
            module_, name = self.slots[key][0]
            if module_._parameters[name].is_meta:
                by_file.setdefault(self.written.get(key, self.files[key]), []).append(key)
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:  # closed (unmapped) after each read
                for key in keys:
                    tensor = f.get_tensor(key)
                    if self.dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(self.dtype)
                    self._set(key, tensor.to(device))
                    module_, name = self.slots[key][0]
                    self.versions[key] = module_._parameters[name]._version

    def unload(self, module: nn.Module, recurse: bool) -> None:
        from safetensors.torch import save_file

        keys = [k for k in self._keys(module, recurse) if not self._param(k).is_meta]
        if any(self._param(k)._version != self.versions.get(k) for k in keys):
            path = self.unit_files.setdefault(id(module), self.out / f"pruned-{len(self.unit_files) + 1:05d}.safetensors")
            save_file({k: self._param(k).detach().cpu().contiguous() for k in keys}, str(path))
            self.written.update({k: path for k in keys})
        for key in keys:
            param = self._param(key)
            self._set(key, torch.empty(param.shape, dtype=param.dtype, device=META))
        self._move_buffers(module, torch.device("cpu"), recurse)

    def _param(self, key: str) -> torch.Tensor:
        module, name = self.slots[key][0]
        return module._parameters[name]

    def finish(self, max_file_bytes: int) -> dict[str, str]:
        """Copy every tensor no block changed from the source files to ``out`` (files of at most
        ``max_file_bytes``, or one tensor) and write the index; returns the weight map."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        weight_map = {key: path.name for key, path in self.written.items()}
        rest: dict[Path, list[str]] = {}
        for key, path in self.files.items():
            if key not in self.written:
                rest.setdefault(path, []).append(key)
        batch: dict[str, torch.Tensor] = {}
        size = 0
        count = 0

        def flush() -> None:
            nonlocal batch, size, count
            if batch:
                count += 1
                name = f"rest-{count:05d}.safetensors"
                save_file(batch, str(self.out / name))
                weight_map.update({k: name for k in batch})
                batch, size = {}, 0

        for path, keys in rest.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    if self.dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(self.dtype)
                    nbytes = tensor.numel() * tensor.element_size()
                    if batch and size + nbytes > max_file_bytes:
                        flush()
                    batch[key] = tensor
                    size += nbytes
        flush()
        total = sum((self.out / name).stat().st_size for name in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
        return weight_map


def prune_streamed(
    model: nn.Module,
    source: str | os.PathLike,
    out: str | os.PathLike,
    device: str | torch.device = "cpu",
    processor: Any = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    **prune_options: Any,
) -> tuple[Path, MaskSet]:
    """Prune ``model`` (from :func:`empty_model` on ``source``) with its weights streamed from ``source`` and
    write the pruned folder to ``out`` atomically: ``(out, masks)``. ``prune_options``: those of
    :func:`~vlmsparse.pipeline.prune.prune_model` (``method``, ``sparsity``, ``allocation``, ``calibration``,
    ...); ``restore_on_error`` is off (the source is never changed; nothing is written on failure)."""
    source = check_model_folder(source)
    out_path = check_output_folder(out, [source], overwrite, option="overwrite=True (--overwrite)", allow_empty=True)
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("prune_streamed: the model's parameters must be on the meta device (build it with "
                         "empty_model); for a loaded model use prune_model(..., device=...)")

    def write(tmp: Path) -> MaskSet:
        weights = StreamedWeights(model, source, tmp, dtype)
        masks = prune_model(model, device=device, weights=weights, restore_on_error=False, **prune_options)
        largest = max((p.stat().st_size for p in set(weights.written.values())), default=0)
        weights.finish(max(largest, 64 * 2**20))
        model.config.save_pretrained(tmp)
        for name in ("generation_config.json",):
            if (source / name).exists():
                shutil.copy2(source / name, tmp / name)
        masks.save(tmp / MASKS_FILENAME)
        if processor is not None:
            processor.save_pretrained(tmp)
        return masks

    masks = write_folder_atomically(out_path, write)
    log.info("saved pruned model (%d masks, sparsity %.4f, weights streamed from %s) to %s", len(masks),
             masks.sparsity(), source, out_path)
    return out_path, masks
