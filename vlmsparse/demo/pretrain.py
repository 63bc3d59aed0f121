"""Train the demo's small LLaVA from scratch on the synthetic VQA task (plain PyTorch loop, CPU friendly).

Model: a CLIP-style vision tower (``image_size / patch_size`` squared patches, CLS dropped) -> 2-layer MLP
projector -> a Llama language model with the word-level tokenizer of :mod:`vlmsparse.data.vocab`. All linear
widths are multiples of 16, so 2:4 and 4:8 patterns apply to every prunable layer.

Examples use the prompt layout of :func:`vlmsparse.data.datasets.encode_example` (so finetuning on the
synthetic dataset continues the same task)::

    <s> USER: <image>...<image> {question} ASSISTANT: {answer} </s>

with the loss on ``{answer} </s>`` only. Every answer is one token, so the greedy generation's first token
is the argmax of the logits at the last prompt position; training stops once that accuracy on the held-out
split reaches ``target_accuracy`` (checked every ``eval_every`` steps).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..data import synthetic
from ..data.vocab import build_processor

__all__ = ["PretrainConfig", "PretrainResult", "build_demo_model", "encode_vqa", "first_token_accuracy", "pretrain"]

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
USER, ASSISTANT = "USER: ", " ASSISTANT:"


@dataclass(frozen=True)
class PretrainConfig:
    """Sizes and budget of the demo model and its training run."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 4
    init_std: float = 0.1
    num_train: int = 6000
    num_heldout: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    max_steps: int = 2000
    eval_every: int = 100
    target_accuracy: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "vision_layers", "text_layers", "heads", "num_train",
                     "num_heldout", "batch_size", "max_steps", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PretrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("vision_hidden", "text_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value % 16:
                raise ValueError(f"PretrainConfig.{name} must be a positive multiple of 16 (for 2:4 / 4:8), got {value!r}")
            if value % self.heads:
                raise ValueError(f"PretrainConfig.{name}={value} must be divisible by heads={self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"PretrainConfig.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if not 0.0 < self.init_std < 1.0:
            raise ValueError(f"PretrainConfig.init_std must be in (0, 1), got {self.init_std!r}")
        if not 0.0 < self.lr < 1.0:
            raise ValueError(f"PretrainConfig.lr must be in (0, 1), got {self.lr!r}")
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise ValueError(f"PretrainConfig.target_accuracy must be in [0, 1], got {self.target_accuracy!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"PretrainConfig.warmup_steps must be >= 0, got {self.warmup_steps!r}")


@dataclass
class PretrainResult:
    model: Any
    processor: Any
    steps: int
    seconds: float
    heldout_accuracy: float
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)


def build_demo_model(config: PretrainConfig, tokenizer: Any):
    """A randomly initialised ``LlavaForConditionalGeneration`` of ``config``'s sizes for ``tokenizer``."""
    from ..models.build import SmallLlavaSizes, build_small_llava

    num_patches = (config.image_size // config.patch_size) ** 2
    sizes = SmallLlavaSizes(
        vocab_size=math.ceil(len(tokenizer) / 16) * 16,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        vision_hidden=config.vision_hidden,
        vision_layers=config.vision_layers,
        text_hidden=config.text_hidden,
        text_layers=config.text_layers,
        heads=config.heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        init_std=config.init_std,
        max_positions=max(128, 2 * (num_patches + 32)),
    )
    return build_small_llava(sizes, seed=config.seed)


def prompt_text(question: str) -> str:
    """The first-turn prompt of :func:`vlmsparse.data.datasets.encode_example` for the LLaVA family."""
    return f"{USER}<image>\n{question}{ASSISTANT}"


def encode_vqa(processor: Any, samples: Sequence[synthetic.VQASample], chunk: int = 512) -> dict[str, torch.Tensor]:
    """Encode samples into right-padded tensors: ``input_ids``/``attention_mask``/``labels`` ``[N, L]``
    (labels = ids on ``{answer} </s>``, -100 elsewhere), ``pixel_values`` ``[N, 3, H, W]`` and
    ``answer_pos`` ``[N]`` (index of the first answer token)."""
    tokenizer = processor.tokenizer
    ids_list, pixel_list = [], []
    prompt_lens, answer_ids = [], []
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        out = processor(images=[s.image for s in part], text=[prompt_text(s.question) for s in part],
                        return_tensors=None, padding=False)
        pixel_list.append(torch.as_tensor(out["pixel_values"]) if not isinstance(out["pixel_values"], list)
                          else torch.stack([torch.as_tensor(p) for p in out["pixel_values"]]))
        for s, ids in zip(part, out["input_ids"]):
            answer = tokenizer(f" {s.answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            prompt_lens.append(len(ids))
            answer_ids.append(answer)
            ids_list.append(list(ids) + answer)
    n, length = len(ids_list), max(len(x) for x in ids_list)
    input_ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, plen, ans) in enumerate(zip(ids_list, prompt_lens, answer_ids)):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        labels[row, plen:plen + len(ans)] = torch.tensor(ans)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "pixel_values": torch.cat(pixel_list).float(),
        "answer_pos": torch.tensor(prompt_lens),
    }


@torch.no_grad()
def first_token_accuracy(model: Any, data: dict[str, torch.Tensor], batch_size: int = 256) -> float:
    """Fraction of rows whose argmax at the last prompt position is the first answer token (= greedy
    generation's first token; all synthetic answers are one token)."""
    was_training = model.training
    model.eval()
    correct = 0
    n = data["input_ids"].shape[0]
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        pos = data["answer_pos"][sl]
        logits = model(input_ids=data["input_ids"][sl], attention_mask=data["attention_mask"][sl],
                       pixel_values=data["pixel_values"][sl]).logits
        rows = torch.arange(pos.numel())
        pred = logits[rows, pos - 1].argmax(-1)
        correct += int((pred == data["labels"][sl][rows, pos]).sum())
    model.train(was_training)
    return correct / max(n, 1)


def pretrain(config: PretrainConfig = PretrainConfig(), progress: bool = True) -> PretrainResult:
    """Generate the synthetic train / held-out sets, build the model and train it with AdamW (linear
    warm-up, cosine decay over ``max_steps``) until the held-out first-token accuracy reaches
    ``config.target_accuracy`` or ``max_steps`` run out. Deterministic for ``config.seed``."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    processor = build_processor(config.image_size, config.patch_size)
    train = encode_vqa(processor, synthetic.make_vqa_samples(config.num_train, seed=config.seed, split="train",
                                                            image_size=config.image_size))
    heldout = encode_vqa(processor, synthetic.make_vqa_samples(config.num_heldout, seed=config.seed, split="heldout",
                                                              image_size=config.image_size))
    model = build_demo_model(config, processor.tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_frac = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_frac)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(config.seed)
    n = train["input_ids"].shape[0]
    order = torch.randperm(n, generator=generator)
    cursor, step, accuracy, history, loss_ema = 0, 0, 0.0, [], None
    bar = tqdm(total=config.max_steps, desc="pretrain", disable=not progress, leave=False)
    while step < config.max_steps:
        if cursor + config.batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor:cursor + config.batch_size]
        cursor += config.batch_size
        length = int(train["attention_mask"][idx].sum(1).max())
        out = model(input_ids=train["input_ids"][idx, :length], attention_mask=train["attention_mask"][idx, :length],
                    pixel_values=train["pixel_values"][idx], labels=train["labels"][idx, :length])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        loss = float(out.loss.detach())
        loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
        bar.update(1)
        if step % config.eval_every == 0 or step == config.max_steps:
            accuracy = first_token_accuracy(model, heldout)
            history.append({"step": step, "loss": round(loss_ema, 5), "heldout_accuracy": accuracy,
                            "seconds": round(time.perf_counter() - start, 2)})
            bar.set_postfix(loss=f"{loss_ema:.3f}", heldout=f"{accuracy:.3f}")
            logger.info("pretrain step %d: loss %.4f, held-out accuracy %.3f", step, loss_ema, accuracy)
            if accuracy >= config.target_accuracy:
                break
    bar.close()
    model.eval()
    return PretrainResult(model=model, processor=processor, steps=step, seconds=time.perf_counter() - start,
                          heldout_accuracy=accuracy, history=history, config=asdict(config))
