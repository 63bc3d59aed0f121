"""FinetuneConfig: what a finetuning run does (a small frozen dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..pipeline.lora import METHODS

__all__ = ["FinetuneConfig", "METHODS", "PARTS"]

PARTS = ("language", "vision", "connector")

# fields a resume may change: bookkeeping, and the length of the run (max_steps / num_epochs: a finished run
# can be extended from its last checkpoint, as with the Trainer; the learning-rate schedule follows the new length)
_RUN_ONLY_FIELDS = ("save_steps", "save_total_limit", "logging_steps", "num_workers", "progress", "max_steps",
                    "num_epochs")


@dataclass(frozen=True)
class FinetuneConfig:
    """A finetuning run.

    method: ``sparselora`` (adapter update multiplied by the mask; merged model keeps the sparsity),
        ``lora`` (plain LoRA; the dense merge loses sparsity, the record says how much), ``lora-remask``
        (plain LoRA training, mask re-applied at merge), ``full`` (all weights of the adapted parts train,
        gradients of pruned entries masked to zero).
    parts: model parts that get adapters (``language``, ``vision``, ``connector``); the connector is untouched
        unless listed. rank_language / rank_vision / rank_connector: LoRA rank per part; lora_alpha: scaling
        numerator (s = lora_alpha / r).
    distill_lambda: weight of KL(teacher || student) in ``(1 - lambda) * CE + lambda * KL`` (0: plain CE).
    temperature: distillation temperature. teacher: ``"self"`` (the same network with adapters and masks off;
        needs the dense weights kept) or the path of a dense checkpoint; None means ``"self"`` when
        distill_lambda > 0.
    max_steps: optimizer steps (> 0 overrides num_epochs). batch_size: per device.
    save_steps: checkpoint (adapters + optimizer state) every N steps; 0 = none.
    packed_base: keep the frozen weights of the adapted linears whose masks are 2:4 packed while training (values +
        2-bit indices, 9/16 of the fp16 bytes and no bool mask, against weight + mask: SparseLoRA over a packed
        base, :mod:`vlmsparse.modules.sparse_lora`); the other linears keep their ``nn.Linear`` base. Only for
        ``method="sparselora"`` without ``teacher="self"`` (which needs the dense weights). The merged model is
        saved as with the ``nn.Linear`` base.
    """

    method: str = "sparselora"
    parts: tuple[str, ...] = ("language", "vision")
    rank_language: int = 8
    rank_vision: int = 4
    rank_connector: int = 8
    lora_alpha: float = 16.0
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    num_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    distill_lambda: float = 0.0
    temperature: float = 1.0
    teacher: str | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    max_length: int | None = None
    save_steps: int = 0
    save_total_limit: int | None = None
    logging_steps: int = 1
    num_workers: int = 0
    progress: bool = True
    packed_base: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not allowed; choose one of {', '.join(METHODS)}")
        if isinstance(self.parts, str) or not self.parts:
            raise ValueError(f"parts={self.parts!r} must be a non-empty tuple of {PARTS}")
        object.__setattr__(self, "parts", tuple(self.parts))
        bad = [p for p in self.parts if p not in PARTS]
        if bad or len(set(self.parts)) != len(self.parts):
            raise ValueError(f"parts={self.parts!r}: allowed parts are {PARTS}, each at most once")
        for name in ("rank_language", "rank_vision", "rank_connector", "batch_size", "grad_accum", "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        for name in ("warmup_steps", "save_steps", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be > 0")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise ValueError(f"num_epochs={self.num_epochs!r} must be > 0 when max_steps is not set (> 0)")
        if not 0.0 <= self.distill_lambda <= 1.0:
            raise ValueError(f"distill_lambda={self.distill_lambda!r} must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length!r} must be None or >= 2")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit={self.save_total_limit!r} must be None or >= 1")
        if self.teacher is not None and self.distill_lambda == 0.0:
            raise ValueError(f"teacher={self.teacher!r} given but distill_lambda=0: set distill_lambda > 0 to distil")
        if self.packed_base and (self.method != "sparselora" or self.teacher_source == "self"):
            raise ValueError(f"packed_base=True needs method='sparselora' and a teacher other than 'self' (the packed "
                             f"base holds the pruned weights only); got method={self.method!r}, teacher="
                             f"{self.teacher_source!r}")

    @property
    def distill(self) -> bool:
        return self.distill_lambda > 0.0

    @property
    def teacher_source(self) -> str | None:
        """``"self"``, a checkpoint path, or None (no distillation)."""
        if not self.distill:
            return None
        return self.teacher or "self"

    def rank(self, part: str) -> int:
        return {"language": self.rank_language, "vision": self.rank_vision, "connector": self.rank_connector}[part]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["parts"] = list(self.parts)
        return out

    def identity(self) -> dict:
        """The fields that define what is trained (a resumed run must match them); ``packed_base`` only when set
        (runs from before it existed resume unchanged)."""
        out = {k: v for k, v in self.to_dict().items() if k not in _RUN_ONLY_FIELDS}
        if not self.packed_base:
            del out["packed_base"]
        return out
