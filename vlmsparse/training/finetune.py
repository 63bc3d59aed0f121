"""``finetune``: restore a pruned VLM with SparseLoRA (or LoRA / full masked finetuning) on HF Trainer.

Models: LLaVA, BLIP-2, InstructBLIP (image-text data; LLaVA also takes text-only conversation rows) and a
language model alone, Llama / OPT (its folder's tokenizer is the processor; data: a conversation JSON of
text-only rows, see :mod:`vlmsparse.data.datasets`; data with images is refused).

Flow: load the pruned model and its MaskSet -> measure sparsity -> swap in adapters for the chosen parts
(``pipeline.lora.add_sparse_lora``) or, for ``full``, unfreeze the part's linears with masked gradients ->
``SparseTrainer`` (CE, optionally distilled from the dense teacher) -> merge -> verify that every pruned
weight is still zero (``W' = W*M + s*(B@A)*M``: zeros of W' == zeros of M) -> save the merged model with its
masks -> JSON record of the run. A ``sparselora`` run also saves its adapter before merging, as a peft adapter
folder plus the masks (``integrations.peft.save_sparse_lora``): ``load_sparse_lora`` / ``PeftModel.from_pretrained``
put it back on the pruned model, and peft's ``merge_and_unload`` gives the merged weights bit for bit.

The Trainer does the distribution: run the same script under ``accelerate launch`` or ``torchrun`` for DDP,
or ``accelerate launch`` with an FSDP2 config (``fsdp_version: 2``; either ``fsdp_state_dict_type``):
after training the main process gathers the full state dict into a meta-device copy of the model and merges,
checks and saves that (DeepSpeed and FSDP1: not verified). Checkpoints: ``output_dir/checkpoint-N``
(trainable tensors gathered to full size + optimizer state, sharded under FSDP; atomic; never the frozen model);
``resume=True`` continues from the latest one, refusing one written by another config.

Output folder::

    output_dir/checkpoint-N/          trainable.safetensors, optimizer.pt, scheduler.pt, rng_state*.pth, ...
    output_dir/merged/                the merged sparse model (save_pretrained) + sparsity_masks.safetensors
    output_dir/adapter/               sparselora only: adapter_config.json + adapter_model.safetensors (peft) + masks
    output_dir/finetune_record.json   config, losses, time, peak memory, sparsity before / after, mask check
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write, write_folder_atomically
from ..masks import MASKS_FILENAME, MaskSet
from ..sparse24 import group_counts
from .config import FinetuneConfig

__all__ = ["finetune", "FinetuneError", "mask_violations", "RECORD_FILENAME", "MERGED_DIRNAME", "ADAPTER_DIRNAME"]

logger = logging.getLogger(__name__)

RECORD_FILENAME = "finetune_record.json"
MERGED_DIRNAME = "merged"
ADAPTER_DIRNAME = "adapter"


class FinetuneError(RuntimeError):
    """The merged model broke its masks (a pruned weight is no longer zero)."""


# ------------------------------------------------------------------------------------------ model parts
def _part_of(model: nn.Module):
    """``name -> part`` (``language`` / ``vision`` / ``connector`` / None) from the architecture spec."""
    from ..models import get_arch_spec

    return get_arch_spec(model).part_of


def _linears_in_parts(model: nn.Module, parts: tuple[str, ...]) -> dict[str, nn.Linear]:
    part_of = _part_of(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and part_of(n) in parts}


def _masks_from_zeros(model: nn.Module) -> MaskSet:
    """A MaskSet with ``mask = (W != 0)`` for every vision / language block linear that has zeros."""
    from ..models import linear_modules, prunable_linear_names

    names = prunable_linear_names(model, ("vision", "language"))
    masks = {}
    for name, module in linear_modules(model, names).items():
        keep = module.weight.detach() != 0
        if not bool(keep.all()):
            masks[name] = keep.cpu()
    if not masks:
        raise ValueError("masks_from_zeros: no vision / language block linear has a zero weight; is this model pruned?")
    return MaskSet(masks=masks, method="from-zeros")


def _masks_fingerprint(masks: MaskSet) -> str:
    h = hashlib.sha256()
    for name, mask in masks.items():
        h.update(name.encode())
        h.update(str(tuple(mask.shape)).encode())
        h.update(mask.to("cpu", torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ sparsity
def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    """The weight module ``name`` computes with, without its adapter: the plain / merged weight, or the
    masked base weight of an unmerged adapter module that keeps its dense weight."""
    from ..modules.sparse_linear import SparseLinear

    module = model.get_submodule(name)
    base = getattr(module, "base_layer", module)
    weight = base.dense_weight() if isinstance(base, SparseLinear) else base.weight.detach()
    if getattr(module, "keep_dense", False) and not getattr(module, "merged", True):
        weight = weight.masked_fill(~module.sparsity_mask, 0)
    return weight


def mask_violations(model: nn.Module, masks: MaskSet) -> dict[str, int]:
    """``{module: number of pruned entries (mask False) whose weight is not exactly zero}``, non-zero counts only."""
    out = {}
    for name, mask in masks.items():
        weight = _weight_of(model, name)
        bad = int((weight[~mask.to(weight.device)] != 0).sum())
        if bad:
            out[name] = bad
    return out


def _sparsity_by_part(model: nn.Module, masks: MaskSet) -> dict[str, float]:
    """Fraction of exact zeros in the masked modules' weights, per part and ``all``."""
    part_of = _part_of(model)
    zeros: dict[str, int] = {}
    total: dict[str, int] = {}
    for name in masks:
        weight = _weight_of(model, name)
        for key in ("all", part_of(name) or "other"):
            zeros[key] = zeros.get(key, 0) + int((weight == 0).sum())
            total[key] = total.get(key, 0) + weight.numel()
    return {k: zeros[k] / total[k] for k in total}


# ------------------------------------------------------------------------------------------ loading
def _load(model: str | os.PathLike | nn.Module, masks: MaskSet | None, masks_from_zeros: bool,
          dense_weights: bool = False) -> tuple[nn.Module, MaskSet, str]:
    """``(model, masks, name)`` from a pruned folder or an in-memory model (see :func:`finetune`);
    ``dense_weights``: the folder may hold dense weights beside its masks (a ``self`` teacher)."""
    if isinstance(model, nn.Module):
        if masks is None:
            if not masks_from_zeros:
                raise ValueError("finetune needs the pruning masks: pass masks=MaskSet, or masks_from_zeros=True "
                                 "to take them from the zeros of the weights")
            masks = _masks_from_zeros(model)
        return model, masks, type(model).__name__
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(path)!r} does not exist")
    if masks is None and not (path / MASKS_FILENAME).exists() and not masks_from_zeros:
        raise ValueError(
            f"{path} has no {MASKS_FILENAME}: it must be pruned first (vlmsparse prune ...), or pass "
            "masks_from_zeros=True (--masks-from-zeros) to take the masks from the zeros of its weights"
        )
    if (path / MASKS_FILENAME).exists() and not dense_weights:
        from ..pipeline.save import load_pruned

        loaded, loaded_masks = load_pruned(path)  # checks the weights against the masks
        masks = masks if masks is not None else loaded_masks
        return loaded, masks, str(path)
    from ..pipeline.save import load_model

    loaded = load_model(path)
    if masks is None:
        masks = MaskSet.load(path) if (path / MASKS_FILENAME).exists() else _masks_from_zeros(loaded)
    return loaded, masks, str(path)


def _load_processor(model: Any, processor: Any) -> Any:
    """The processor saved in the model folder (``AutoProcessor``; for a language model alone that is its
    tokenizer), else its tokenizer (:func:`vlmsparse.pipeline.save.load_processor`), else None."""
    if processor is not None or not isinstance(model, (str, os.PathLike)):
        return processor
    from transformers import AutoProcessor

    from ..pipeline.save import load_processor

    try:
        return AutoProcessor.from_pretrained(model)
    except (ImportError, ValueError):  # no torchvision: the PIL image processors
        return AutoProcessor.from_pretrained(model, use_fast=False)
    except (OSError, KeyError, TypeError):  # no processor files: the tokenizer, if any
        return load_processor(model)


def _check_layout(example: dict, decoder_start: int | None, text_only: bool, model_name: str) -> None:
    """ValueError when an encoded example is laid out for another kind of model: an encoder-decoder language
    model needs ``decoder_input_ids`` (see :func:`vlmsparse.data.datasets.encode_example`), a decoder-only one
    must not have them, and a language model alone takes no ``pixel_values``."""
    has_decoder = "decoder_input_ids" in example
    if has_decoder != (decoder_start is not None):
        need = (f"an encoder-decoder language model: build the dataset with decoder_start_token_id={decoder_start}"
                if decoder_start is not None else "a decoder-only language model: build the dataset without "
                "decoder_start_token_id")
        raise ValueError(f"the dataset's examples {'have' if has_decoder else 'lack'} decoder_input_ids but "
                         f"{model_name} has {need}")
    if text_only and "pixel_values" in example:
        raise ValueError(f"the dataset's examples have pixel_values, but {model_name} is a language model alone: "
                         "it trains on text-only examples (conversation rows without 'image')")


# ---------------------------------------------------------------------------------------- adapters
def _attach(model: nn.Module, masks: MaskSet, config: FinetuneConfig, keep_dense: bool) -> None:
    """Freeze the model and add adapters on ``config.parts`` (``pipeline.lora.add_sparse_lora``), or for
    ``full`` unfreeze the masked linears of those parts with masked gradients. The connector has no masks:
    when listed, its linears get adapters with an all-keep mask (a dense LoRA)."""
    from ..pipeline.lora import add_sparse_lora

    part_of = _part_of(model)
    targets = dict(masks.masks)
    if "connector" in config.parts:
        for name, module in _linears_in_parts(model, ("connector",)).items():
            targets.setdefault(name, torch.ones_like(module.weight, dtype=torch.bool))
    for p in model.parameters():
        p.requires_grad_(False)
    add_sparse_lora(
        model, targets, r={p: config.rank(p) for p in ("language", "vision", "connector")},
        lora_alpha=config.lora_alpha, method=config.method, keep_dense=keep_dense,
        target=lambda module, name: part_of(name) in config.parts,
    )


def _check_weights(model: nn.Module, masks: MaskSet, dense_teacher: bool) -> bool:
    """Whether the weights are dense outside the masks (kept for a ``self`` teacher); ValueError when they
    are but no such teacher asks for them (the masks would not describe the weights)."""
    outside = sum(int(((_weight_of(model, n) != 0) & ~m.to(_weight_of(model, n).device)).sum()) for n, m in masks.items())
    if outside and not dense_teacher:
        raise ValueError(
            f"{outside} weights outside the masks are non-zero: the masks do not describe these weights (prune "
            "the model first), unless the dense weights were kept on purpose for teacher='self' (--teacher self) "
            "distillation"
        )
    return outside > 0


def _teacher_fn(config: FinetuneConfig, student: nn.Module):
    """``fn(model, inputs) -> teacher logits`` (no gradients are taken through it), or None."""
    source = config.teacher_source
    if source is None:
        return None
    if source == "self":
        from ..pipeline.lora import teacher_mode

        def run_self(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            with teacher_mode(model):
                return model(**inputs).logits

        return run_self
    from ..pipeline.save import load_model

    if not Path(source).is_dir():
        raise FileNotFoundError(f"teacher folder {str(source)!r} does not exist (the teacher is a local folder of "
                                "the dense model, or 'self')")
    teacher = load_model(source)
    if type(teacher) is not type(student):
        raise ValueError(f"the teacher {source} is a {type(teacher).__name__}, the student a "
                         f"{type(student).__name__}: distillation needs the dense version of the same model")
    for p in teacher.parameters():
        p.requires_grad_(False)
    holder: dict[str, nn.Module] = {"teacher": teacher}

    def run_dense(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(model.parameters()).device
        if next(holder["teacher"].parameters()).device != device:
            holder["teacher"] = holder["teacher"].to(device)
        return holder["teacher"](**inputs).logits

    return run_dense


def _prune_unadapted(model: nn.Module, masks: MaskSet) -> None:
    """With dense weights kept, masked linears left without an adapter (parts not finetuned) get their mask
    applied, so the student is the pruned model (the teacher then sees those layers pruned as well)."""
    from ..modules.sparse_lora import SparseLoRALinear

    for name, mask in masks.items():
        module = model.get_submodule(name)
        if not isinstance(module, SparseLoRALinear):
            with torch.no_grad():
                module.weight.masked_fill_(~mask.to(module.weight.device), 0)
            logger.warning("teacher='self': %s has no adapter; its pruned weights are zeroed for both", name)


def _pack_bases(model: nn.Module, masks: MaskSet, config: FinetuneConfig) -> None:
    """``packed_base``: the linears of the adapted parts whose masks keep exactly 2 of every 4 inputs become packed
    2:4 ``SparseLinear`` modules (packed at their masks' positions), the frozen base the adapters then wrap."""
    from ..pipeline.compress import compress

    part_of = _part_of(model)
    two_four = {n: m for n, m in masks.items() if part_of(n) in config.parts and m.shape[1] % 4 == 0
                and bool((group_counts(m) == 2).all())}
    if not two_four:
        raise ValueError(f"packed_base=True: no adapted linear (parts {config.parts}) has a 2:4 mask; the packed "
                         "base is the 2:4 format")
    compress(model, two_four, backend="packed24", progress=False)
    logger.info("packed_base: %d of %d masked linears keep their frozen weights packed 2:4", len(two_four),
                len(masks))


def _merge(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    if config.method == "full":
        return model
    from ..pipeline.compress import decompress
    from ..pipeline.lora import merge_sparse_lora

    merged = merge_sparse_lora(model, check=False)  # the check below reports every module, then fails
    decompress(merged)  # packed_base: the merged packed modules saved as nn.Linear, like the other runs
    return merged


# ------------------------------------------------------------------------------------------ resume
def _latest_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def _resolve_resume(output_dir: Path, resume: bool | str | os.PathLike, run_config: dict) -> Path | None:
    existing = _latest_checkpoint(output_dir) if output_dir.exists() else None
    if not resume and (output_dir / RECORD_FILENAME).exists():
        raise FileExistsError(f"{output_dir} holds a finished run ({RECORD_FILENAME}); choose a new output folder")
    if not resume:
        if existing is not None:
            raise FileExistsError(
                f"{output_dir} already holds checkpoints of a run ({existing.name}); pass resume=True (--resume) "
                "to continue it, or choose a new output folder"
            )
        return None
    checkpoint = existing if resume is True else Path(resume)
    if checkpoint is None:
        raise FileNotFoundError(f"resume: no checkpoint-N folder in {output_dir}")
    from .trainer import RUN_CONFIG_FILENAME

    saved_path = checkpoint / RUN_CONFIG_FILENAME
    if not saved_path.is_file():
        raise FileNotFoundError(f"resume: {checkpoint} is not a vlmsparse finetune checkpoint (no {RUN_CONFIG_FILENAME})")
    saved = json.loads(saved_path.read_text())
    differ = {k: (saved.get(k), v) for k, v in run_config.items() if saved.get(k) != v}
    if differ:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"resume: {checkpoint} was written by a different config ({listed})")
    return checkpoint


# ------------------------------------------------------------------------------------------ saving
def _peak_memory() -> dict[str, float]:
    out: dict[str, float] = {}
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(ImportError):
        import resource

        out["host_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return out


# --------------------------------------------------------------------------------------------- main
def finetune(
    model: str | os.PathLike | nn.Module,
    data: str | os.PathLike | torch.utils.data.Dataset,
    output_dir: str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    masks: MaskSet | None = None,
    processor: Any = None,
    masks_from_zeros: bool = False,
    resume: bool | str | os.PathLike = False,
    image_root: str | os.PathLike | None = None,
    callbacks: list | None = None,
    **overrides: Any,
) -> dict:
    """Finetune a pruned model and return the run record (also written to ``output_dir/finetune_record.json``).

    model: a pruned model folder (with ``sparsity_masks.safetensors``) or an in-memory model with ``masks``.
    data: a Dataset of encoded examples, or a spec for :func:`vlmsparse.data.datasets.load_dataset`
        (``.json`` conversations, ``.jsonl`` captions, ``synthetic`` or ``synthetic:N``; needs the processor).
    config: a :class:`FinetuneConfig`; keyword ``overrides`` replace its fields (``method="lora"``, ...).
    masks_from_zeros: take the masks from the zeros of the weights when the folder has no mask file.
    resume: True (latest ``checkpoint-N`` in ``output_dir``) or a checkpoint folder; its config must match.

    Raises FinetuneError when a method that must keep the masks (all but ``lora``) broke one.

    Steps: :func:`_with_overrides` -> :func:`_load` (student, masks) -> :func:`_resolve_resume` ->
    :func:`_training_data` -> :func:`_prepare_student` (adapters, teacher) -> :func:`_build_trainer` -> train ->
    :func:`_merge_trained` (merge and check, gathered under FSDP) -> :func:`_run_record` -> :func:`_save_run`.
    """
    from ..models import decoder_start_token_id, get_arch_spec

    config = _with_overrides(config, overrides)
    output_dir = Path(output_dir)
    student, masks, model_name = _load(model, masks, masks_from_zeros, dense_weights=config.teacher_source == "self")
    processor = _load_processor(model, processor)  # after _load: a missing folder is reported as such
    text_only = get_arch_spec(student).image_tokens is None  # a language model alone (Llama / OPT)
    if text_only and isinstance(data, (str, os.PathLike)) and str(data).split(":", 1)[0] == "synthetic":
        raise ValueError(f"data {str(data)!r}: the synthetic data set is image-text, but {model_name} is a language "
                         "model alone; give a conversation JSON of text-only rows (no 'image')")
    decoder_start = decoder_start_token_id(student)
    run_config = {**config.identity(), "masks": _masks_fingerprint(masks)}
    checkpoint = _resolve_resume(output_dir, resume, run_config)
    dataset, data_name = _training_data(data, processor, config, image_root, decoder_start, text_only, model_name)
    teacher_fn, sparsity_before, trainable = _prepare_student(student, masks, config, model_name)
    trainer = _build_trainer(student, dataset, processor, config, output_dir, run_config, teacher_fn, callbacks)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fsdp = trainer.is_fsdp_enabled  # the model is sharded when training starts: keep a frame to gather it into
    if fsdp and config.packed_base:
        raise ValueError("packed_base=True is not supported under FSDP (it shards parameters; a packed base is "
                         "buffers): train with the nn.Linear base, or with DDP / one process")
    frame = _meta_frame(student) if fsdp and trainer.args.should_save else None

    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_time = time.perf_counter() - start
    peak = _peak_memory()

    merged, violations, sparsity_after, checkpointing, adapter = _merge_trained(trainer, frame, fsdp, config, masks,
                                                                                output_dir)
    record = _run_record(
        model_name=model_name, data_name=data_name, num_examples=len(dataset), config=config, checkpoint=checkpoint,
        trainer=trainer, result=result, checkpointing=checkpointing, trainable=trainable, train_time=train_time,
        peak=peak, masks=masks, fingerprint=run_config["masks"], sparsity_before=sparsity_before,
        sparsity_after=sparsity_after, violations=violations, adapter=adapter,
    )
    _save_run(record, output_dir, trainer, config, masks, merged, violations, processor,
              source=model if isinstance(model, (str, os.PathLike)) else None)
    return record


def _with_overrides(config: FinetuneConfig | None, overrides: dict[str, Any]) -> FinetuneConfig:
    """``config`` (default :class:`FinetuneConfig`) with the keyword ``overrides`` of :func:`finetune` applied;
    an unknown field raises ValueError."""
    valid = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown finetune option(s) {unknown}; allowed: {sorted(valid)}")
    return replace(config or FinetuneConfig(), **overrides)


def _training_data(data: str | os.PathLike | torch.utils.data.Dataset, processor: Any, config: FinetuneConfig,
                   image_root: str | os.PathLike | None, decoder_start: int | None, text_only: bool,
                   model_name: str) -> tuple[Any, str]:
    """``(dataset, name)``: ``data`` as given (a Dataset) or read with the processor from a file / spec; its first
    example is checked against the model's layout (:func:`_check_layout`)."""
    from ..data.datasets import load_dataset

    if isinstance(data, (str, os.PathLike)):
        if processor is None:
            raise ValueError("data given as a file or spec needs the model's processor: pass processor=..., or save "
                             "the processor (or, for a language model alone, the tokenizer) in the model folder")
        dataset = load_dataset(str(data), processor, image_root=image_root, max_length=config.max_length,
                               seed=config.seed, decoder_start_token_id=decoder_start)
        data_name = str(data)
    else:
        dataset, data_name = data, type(data).__name__
    _check_layout(dataset[0], decoder_start, text_only, model_name)
    return dataset, data_name


def _prepare_student(student: nn.Module, masks: MaskSet, config: FinetuneConfig,
                     model_name: str) -> tuple[Any, dict[str, float], int]:
    """Attach the adapters (or unfreeze for ``full``) with the run's seed and build the teacher; returns
    ``(teacher_fn, sparsity before training by part, number of trainable parameters)``. ``teacher="self"``
    needs the dense weights kept and a method with adapters (ValueError otherwise)."""
    self_teacher = config.teacher_source == "self"
    dense_kept = _check_weights(student, masks, self_teacher)
    if self_teacher and (not dense_kept or config.method == "full"):
        raise ValueError(
            "teacher='self' (--teacher self) runs the network with adapters and masks off, so it needs the dense "
            "weights kept beside the masks (and a method with adapters, not 'full'); "
            + ("this model's weights are already pruned; " if not dense_kept else "")
            + "pass teacher=<path of the dense checkpoint> (--teacher DENSE_FOLDER) instead"
        )
    if config.packed_base:
        _pack_bases(student, masks, config)
    torch.manual_seed(config.seed)  # the adapters' initialisation: the same seed gives the same run
    _attach(student, masks, config, keep_dense=self_teacher)
    if self_teacher:
        _prune_unadapted(student, masks)
    sparsity_before = _sparsity_by_part(student, masks)
    teacher_fn = _teacher_fn(config, student)
    student.train()
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"no trainable parameter: parts {config.parts} have no linear layer in {model_name}")
    return teacher_fn, sparsity_before, trainable


def _pad_token_id(processor: Any, model: nn.Module) -> int:
    """The tokenizer's pad id, else the model config's (or its text config's), else 0."""
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or getattr(
            getattr(model.config, "text_config", None), "pad_token_id", None) or 0
    return pad_id


def _build_trainer(student: nn.Module, dataset: Any, processor: Any, config: FinetuneConfig, output_dir: Path,
                   run_config: dict, teacher_fn: Any, callbacks: list | None) -> Any:
    """The :class:`~vlmsparse.training.trainer.SparseTrainer` of the run: ``TrainingArguments`` from ``config``,
    the VLM collator, distillation, and one loss bar (``progress``) or no printed logs."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..data.datasets import VLMCollator, image_token_id
    from ..models import get_arch_spec
    from .trainer import LossBarCallback, SparseTrainer

    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        bf16=config.bf16,
        **_checkpointing_args(TrainingArguments, config.gradient_checkpointing),
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=config.num_workers,
        disable_tqdm=not config.progress,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        save_only_model=False,
    )
    collator = VLMCollator(_pad_token_id(processor, student), image_token_id(processor),
                           flat_images=get_arch_spec(student).flat_images)
    trainer = SparseTrainer(
        model=student, args=args, train_dataset=dataset, data_collator=collator,
        callbacks=callbacks, teacher_fn=teacher_fn, distill_lambda=config.distill_lambda,
        temperature=config.temperature, run_config=run_config,
    )
    if config.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossBarCallback())
    else:
        trainer.remove_callback(PrinterCallback)  # the losses go to the record
    return trainer


def _merge_trained(trainer: Any, frame: nn.Module | None, fsdp: bool, config: FinetuneConfig, masks: MaskSet,
                   output_dir: Path) -> tuple[nn.Module | None, dict[str, int], dict[str, float], bool, Path | None]:
    """Save the adapter (``sparselora``, main process), merge the trained model and check its zeros against
    ``masks``: ``(merged model or None on a non-main FSDP rank, mask violations, sparsity after by part, whether
    activation checkpointing was on, the adapter folder or None)``. Under FSDP the full state dict is gathered
    into ``frame`` first (collective) and the results are broadcast from rank 0."""
    model_out = trainer.accelerator.unwrap_model(trainer.model)
    checkpointing = _checkpointing_on(model_out)
    if fsdp:  # collective; the full tensors land on the main process, which merges, checks and saves
        full = trainer.accelerator.get_state_dict(trainer.model)
        if frame is not None:
            frame.load_state_dict(full, strict=True, assign=True)
        model_out = frame
    merged, violations, sparsity_after, adapter = None, None, None, None
    if model_out is not None:
        model_out.eval()
        if config.method == "sparselora" and trainer.args.should_save:
            adapter = _save_adapter(model_out, output_dir / ADAPTER_DIRNAME)
        merged = _merge(model_out, config)
        violations = mask_violations(merged, masks)
        sparsity_after = _sparsity_by_part(merged, masks)
    if fsdp:
        from accelerate.utils import broadcast_object_list

        violations, sparsity_after = broadcast_object_list([violations, sparsity_after], from_process=0)
    return merged, violations, sparsity_after, checkpointing, adapter


def _save_adapter(model: nn.Module, path: Path) -> Path:
    """The unmerged adapters as a peft adapter folder + masks (``integrations.peft.save_sparse_lora``), atomically."""
    from ..integrations.peft import save_sparse_lora

    write_folder_atomically(path, lambda tmp: save_sparse_lora(model, tmp))
    return path


def _run_record(*, model_name: str, data_name: str, num_examples: int, config: FinetuneConfig,
                checkpoint: Path | None, trainer: Any, result: Any, checkpointing: bool, trainable: int,
                train_time: float, peak: dict[str, float], masks: MaskSet, fingerprint: str,
                sparsity_before: dict[str, float], sparsity_after: dict[str, float],
                violations: dict[str, int], adapter: Path | None) -> dict:
    """The JSON record of the run (``merged_model`` is filled in by :func:`_save_run`)."""
    losses = [
        {k: entry[k] for k in ("step", "loss", "ce", "kl", "learning_rate", "grad_norm") if k in entry}
        for entry in trainer.state.log_history if "loss" in entry
    ]
    return {
        "model": model_name,
        "data": data_name,
        "num_examples": num_examples,
        "config": config.to_dict(),
        "teacher": config.teacher_source,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "world_size": trainer.args.world_size,
        "gradient_checkpointing": checkpointing,
        "steps": trainer.state.global_step,
        "trainable_parameters": trainable,
        "losses": losses,
        "final_loss": losses[-1]["loss"] if losses else None,
        "train_loss": result.training_loss,
        "train_time_s": train_time,
        "samples_per_second": result.metrics.get("train_samples_per_second"),
        "peak_memory": peak,
        "masks": {"modules": len(masks), "sparsity": masks.sparsity(), "fingerprint": fingerprint},
        "sparsity_before": sparsity_before,
        "sparsity_after": sparsity_after,
        "sparsity_lost": max(0.0, sparsity_before["all"] - sparsity_after["all"]),
        "mask_check": {
            "ok": not violations,
            "required": config.method != "lora",
            "modules_violating": len(violations),
            "pruned_entries_nonzero": sum(violations.values()),
        },
        "merged_model": None,
        "adapter": str(adapter) if adapter is not None else None,
        "torch": torch.__version__,
    }


def _save_run(record: dict, output_dir: Path, trainer: Any, config: FinetuneConfig, masks: MaskSet,
              merged: nn.Module | None, violations: dict[str, int], processor: Any,
              source: str | os.PathLike | None) -> None:
    """On the main process: write the record and, unless a method that must keep the masks broke one (then
    FinetuneError after writing the record), the merged model with its masks under ``output_dir/merged``."""
    from ..pipeline.save import save_pruned

    keeps_masks = config.method != "lora"
    record_path = output_dir / RECORD_FILENAME
    is_main = trainer.args.should_save
    if violations and keeps_masks:
        if is_main:
            _write_json(record_path, record)
        worst = sorted(violations.items(), key=lambda kv: -kv[1])[:3]
        raise FinetuneError(
            f"method {config.method!r} must keep the masks, but {sum(violations.values())} pruned weights in "
            f"{len(violations)} modules are non-zero after merge (e.g. {worst}); the merged model was not saved"
        )
    merged_dir = output_dir / MERGED_DIRNAME
    record["merged_model"] = str(merged_dir)
    if is_main:
        out_masks = masks if keeps_masks else _masks_from_zeros_or_none(merged, masks)
        save_pruned(merged, out_masks, merged_dir, processor=processor, overwrite=True, source=source)
        _write_json(record_path, record)
        logger.info("finetune: %d steps in %.1fs, merged model in %s", record["steps"], record["train_time_s"],
                    merged_dir)
    trainer.accelerator.wait_for_everyone()


def _meta_frame(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory; buffers such as the masks are
    copied): under FSDP the gathered full state dict is loaded into it (``assign=True``) to merge and save."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _masks_from_zeros_or_none(model: nn.Module, masks: MaskSet) -> MaskSet:
    """For ``lora``: the masks of the merged (dense-updated) weights, as they are now."""
    return MaskSet(masks={n: (_weight_of(model, n) != 0).cpu() for n in masks}, method="lora-merged")


def _checkpointing_args(arguments_class: type, enabled: bool) -> dict[str, Any]:
    """The activation-checkpointing fields of ``TrainingArguments`` under the installed transformers:
    ``activation_checkpointing[_kwargs]`` (5.2x) or the older ``gradient_checkpointing[_kwargs]`` (5.17)."""
    names = {f.name for f in fields(arguments_class)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled, f"{key}_kwargs": {"use_reentrant": False} if enabled else None}


def _checkpointing_on(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the newer name first
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
