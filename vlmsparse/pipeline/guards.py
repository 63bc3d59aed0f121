"""The checks run before anything is written, so a bad output or a wrong mask is reported before long work and
no input is ever lost: output folder / file guards, the model folders an output may not replace, and the
masks-against-weights check, and the device a run asks for. Used by :mod:`vlmsparse.pipeline.save`, :mod:`vlmsparse.pipeline.compress`, the
evaluation writer and the CLI (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..masks import MaskSet

__all__ = ["model_source_dirs", "check_output_folder", "check_output_file", "check_masks", "check_device"]


def model_source_dirs(model: nn.Module) -> list[Path]:
    """The existing local folders a model was loaded from (its ``name_or_path`` / ``config._name_or_path``):
    the inputs an output folder must never replace."""
    out = []
    for value in (getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)):
        if value and os.path.isdir(value):
            out.append(Path(value).resolve())
    return out


def check_output_folder(out_dir: str | os.PathLike, inputs: list[str | os.PathLike], overwrite: bool,
                        option: str = "overwrite=True (--overwrite)", allow_empty: bool = False) -> Path:
    """The resolved output folder, after refusing what would lose data: an output equal to, inside or
    containing an input folder (replacing it would delete the input), and an existing path unless ``overwrite``
    (or, with ``allow_empty``, it is an empty folder, as ``save_pretrained`` users create beforehand).
    Call it before long work, so a bad output is reported before the work is done."""
    out = Path(out_dir).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source or out in source.parents or source in out.parents:
            raise ValueError(f"refusing to write {out}: it is, contains or lies inside the input model {source}; "
                             "choose a folder outside the input")
    empty_folder = out.is_dir() and not any(out.iterdir())
    if out.exists() and not overwrite and not (allow_empty and empty_folder):
        raise FileExistsError(f"{out} already exists; choose another folder or pass {option} to replace it")
    return out


def check_output_file(path: str | os.PathLike, inputs: list[str | os.PathLike | None], overwrite: bool,
                      flag: str, option: str = "overwrite=True (--overwrite)") -> Path:
    """Refuse an output file ``path`` (``flag`` names it in messages: the parameter and its command-line flag,
    e.g. ``"results (--results)"``) that is a folder, one of the ``inputs`` files, or an existing file unless
    ``overwrite`` (ValueError / FileExistsError; ``option`` names how to pass ``overwrite``); returns it as a
    Path. Call it before long work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give the path of the JSON file to write")
    for given in inputs:
        if given is not None and path.resolve() == Path(given).resolve():
            raise ValueError(f"{flag} {path}: is the file {given} given as another argument; choose another file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path}: the file already exists; pass {option} to replace it")
    return path


def check_masks(model: nn.Module, masks: MaskSet) -> None:
    """Raise ``ValueError`` if a mask names no linear of ``model``, has the wrong shape, or a weight is non-zero
    where its mask prunes."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"mask {name!r} names no module with a weight in {type(model).__name__}")
        if tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, weight has {tuple(weight.shape)}")
        if bool((weight.detach()[~mask.to(weight.device)] != 0).any()):
            raise ValueError(f"{name}: weight is non-zero at positions its mask prunes")


def check_device(name: str | None, option: str = "device") -> str:
    """The device to run on: ``name`` checked (a torch device name; ``cuda`` needs CUDA, ``cuda:N`` an existing
    device N), or, when ``name`` is None, ``cuda`` if available, else ``cpu``. The ValueError names ``option``
    (e.g. ``--device``)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option} {name!r} is not a device name; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {name}: CUDA is not available on this machine; use {option} cpu "
                             f"(or leave {option} out to use cuda only when available)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return name
