"""``SparseTrainer``: a ``transformers.Trainer`` for adapter finetuning of pruned VLMs.

What it changes from the stock Trainer (everything else, including DDP / FSDP / DeepSpeed through
``accelerate launch`` or ``torchrun``, is the Trainer's own):

- loss: ``(1 - lambda) * CE + lambda * KL(teacher || student)`` on answer tokens (``training.losses``); the
  teacher is a callable ``teacher_fn(model, inputs) -> logits`` run without gradients;
- checkpoints hold the trainable parameters only (``trainable.safetensors``: adapters, or the masked weights
  for ``full``) plus the Trainer's optimizer / scheduler / RNG / state files, and the run's config
  (``vlmsparse_finetune.json``); each is written into a staging folder and renamed into place, so a
  ``checkpoint-N`` folder is complete or absent;
- resume loads ``trainable.safetensors`` back (the Trainer restores optimizer, scheduler, RNG, step);
- logs add the mean CE and KL since the last log (over all processes, like the loss); the progress bar
  shows loss and speed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .._io import atomic_write
from ..modules.sparse_lora import migrate_state_dict
from .losses import distillation_loss

__all__ = ["SparseTrainer", "LossBarCallback", "TRAINABLE_FILENAME", "RUN_CONFIG_FILENAME", "trainable_state_dict"]

logger = logging.getLogger(__name__)

TRAINABLE_FILENAME = "trainable.safetensors"
RUN_CONFIG_FILENAME = "vlmsparse_finetune.json"
_STAGING = ".staging"

TeacherFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (``requires_grad``), detached on CPU, by name."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


class LossBarCallback(ProgressCallback):
    """The Trainer's progress bar (steps, it/s) with the latest loss (and CE / KL) as its postfix
    instead of a printed line per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            keys = ("loss", "ce", "kl") if "kl" in logs else ("loss",)
            shown = {k: f"{logs[k]:.4f}" for k in keys if isinstance(logs.get(k), (int, float))}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class SparseTrainer(Trainer):
    """Trainer with the distillation loss, trainable-only atomic checkpoints and a config guard.

    ``teacher_fn(model, inputs) -> logits`` gives the teacher's logits for the model inputs (``model`` is the
    unwrapped student, for a teacher that is the student with adapters and masks off); None: no distillation.
    ``run_config``: JSON-able dict written into every checkpoint (and compared on resume by the caller).
    """

    def __init__(self, *args: Any, teacher_fn: TeacherFn | None = None, distill_lambda: float = 0.0,
                 temperature: float = 1.0, run_config: dict | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if distill_lambda > 0 and teacher_fn is None:
            raise ValueError("distill_lambda > 0 needs a teacher_fn")
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if (self.is_fsdp_enabled and not self.accelerator.is_fsdp2 and self.args.save_strategy != "no"
                and "FULL" not in str(plugin.state_dict_type)):
            raise ValueError(
                f"FSDP1 checkpoints of SparseTrainer need fsdp_state_dict_type: FULL_STATE_DICT (got "
                f"{plugin.state_dict_type}): a checkpoint holds the full trainable tensors, gathered on the main "
                "process; set it in the accelerate config, use FSDP2 (fsdp_version: 2), or turn checkpoints off "
                "(save_steps=0)"
            )
        self.teacher_fn = teacher_fn
        self.distill_lambda = distill_lambda
        self.temperature = temperature
        self.run_config = run_config or {}
        # compute_loss returns a per-micro-batch mean, for the Trainer to divide by the accumulation steps:
        # transformers >= 5.2x reads loss_is_scaled_for_ga, 5.17 divides only when the model takes no loss kwargs
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self._parts_sum = {"ce": 0.0, "kl": 0.0}
        self._parts_count = 0

    # ------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs)
        teacher_logits = None
        if self.teacher_fn is not None and self.distill_lambda > 0 and model.training:
            with torch.no_grad():
                teacher_logits = self.teacher_fn(self.accelerator.unwrap_model(model), model_inputs)
        loss, ce, kl = distillation_loss(outputs.logits, labels, teacher_logits, self.distill_lambda, self.temperature)
        if model.training:
            self._parts_sum["ce"] = self._parts_sum["ce"] + ce  # tensors: no device sync per step
            self._parts_sum["kl"] = self._parts_sum["kl"] + (kl if kl is not None else 0.0)
            self._parts_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts_count:  # every process logs: the means are over all processes, as "loss"
            parts = torch.stack([torch.as_tensor(self._parts_sum[k], dtype=torch.float32, device=self.args.device)
                                 for k in ("ce", "kl")]).detach() / self._parts_count
            if self.accelerator.num_processes > 1:
                parts = self.accelerator.reduce(parts, reduction="mean")
            ce, kl = parts.tolist()
            logs["ce"] = round(ce, 6)
            if self.teacher_fn is not None:
                logs["kl"] = round(kl, 6)
            self._parts_sum = {"ce": 0.0, "kl": 0.0}
            self._parts_count = 0
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------- checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the trainable parameters (not the frozen model) and the run config into ``output_dir``."""
        from safetensors.torch import save_file

        if not self.args.should_save:  # under FSDP every rank joins the gather; the main process writes
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            tensors = trainable_state_dict(model)
        else:  # gathered by the Trainer (FSDP full state dict: the local parameters are shards)
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            missing = [n for n in names if n not in state_dict]
            if missing:
                raise ValueError(f"the gathered state dict lacks {len(missing)} trainable tensors (e.g. {missing[0]!r}); "
                                 "use a full state dict (fsdp_state_dict_type: FULL_STATE_DICT)")
            tensors = {n: state_dict[n].detach().to("cpu").contiguous() for n in names}
        atomic_write(os.path.join(output_dir, TRAINABLE_FILENAME), lambda tmp: save_file(tensors, tmp))
        text = json.dumps(self.run_config, indent=2, sort_keys=True)
        atomic_write(os.path.join(output_dir, RUN_CONFIG_FILENAME), lambda tmp: open(tmp, "w").write(text))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2, gather only the trainable parameters (every process joins each all-gather) and let the
        main process write them; the stock Trainer gathers the whole model first. Otherwise the Trainer's own."""
        if not (self.is_fsdp_enabled and self.accelerator.is_fsdp2):
            super().save_model(output_dir, _internal_call)
            return
        model = self.accelerator.unwrap_model(self.model)
        tensors = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                full = param.full_tensor() if isinstance(param, DTensor) else param
                tensors[name] = full.detach().to("cpu").contiguous()
        self._save(output_dir, state_dict=tensors)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP, the sharded optimizer and the scheduler, without the Trainer's full-model file
        (``save_fsdp_model``: the whole frozen model in every checkpoint); resume reads ``trainable.safetensors``."""
        if not self.is_fsdp_enabled:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model,
                            output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written under ``output_dir/.staging`` then renamed to ``checkpoint-N``."""
        run_dir = self.args.output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, _STAGING)
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.output_dir, self.args.save_total_limit = staging_root, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir, self.args.save_total_limit = run_dir, limit
        self.accelerator.wait_for_everyone()  # every process wrote its files (RNG state per rank)
        if self.args.should_save:
            if os.path.exists(final):  # an older checkpoint of the same step: move aside, then delete
                old = os.path.join(staging_root, f"{name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(os.path.join(staging_root, name), final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(os.path.join(staging_root, name), final)
            with contextlib.suppress(OSError):
                os.rmdir(staging_root)  # only when empty
            if limit is not None:
                rotate_checkpoints(output_dir=run_dir, save_total_limit=limit, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Load ``trainable.safetensors``: its names must be exactly the trainable parameters."""
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        path = os.path.join(resume_from_checkpoint, TRAINABLE_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{resume_from_checkpoint} is not a vlmsparse checkpoint (no {TRAINABLE_FILENAME})")
        saved = migrate_state_dict(load_file(path), model)  # checkpoints of the earlier own layer's key layout
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(saved) != set(params):
            missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} does not match this model's trainable parameters "
                f"(missing {missing[:3]}..., unexpected {extra[:3]}...): was it written by a different config?"
            )
        with torch.no_grad():
            for name, param in params.items():
                if saved[name].shape != param.shape:
                    raise ValueError(f"checkpoint {resume_from_checkpoint}: {name} has shape {tuple(saved[name].shape)}, "
                                     f"model has {tuple(param.shape)}")
                value = saved[name].to(param.device, param.dtype)
                if isinstance(param, DTensor):  # FSDP2 shard: every rank read the full tensor, keeps its part
                    value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                param.copy_(value)
        logger.info("resumed %d trainable tensors from %s", len(params), resume_from_checkpoint)

    def _load_best_model(self) -> None:  # pragma: no cover - no evaluation-driven best model here
        raise NotImplementedError("load_best_model_at_end is not supported by SparseTrainer")
