"""Batched greedy answers of a VLM to question rows (padding chosen so an answer does not depend on its batch)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ...data.records import load_image
from ...kernels import cpu_gemm
from ...models import decoder_start_token_id
from .rows import VQARow

__all__ = ["default_prompt", "generate_answers"]


def default_prompt(processor: Any) -> str:
    """The question prompt for the processor's family: LLaVA ``USER: <image>\\n{question} ASSISTANT:``;
    processors that add the image tokens themselves (BLIP-2 / InstructBLIP) ``Question: {question} Short answer:``."""
    if hasattr(processor, "num_query_tokens"):
        return "Question: {question} Short answer:"
    return "USER: <image>\n{question} ASSISTANT:"


def _open_image(image: Any) -> Any:
    return load_image(image) if isinstance(image, (str, os.PathLike)) else image


@torch.no_grad()
def _check_image_tokens(model: Any, input_ids: torch.Tensor) -> None:
    """Every row must hold the model's image token: BLIP-2 / InstructBLIP silently ignore the image
    otherwise (and LLaVA needs one token per patch), so a processor that does not insert them is an error."""
    config = model.config
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        return
    missing = int((~(input_ids == token).any(dim=1)).sum())
    if missing:
        raise ValueError(
            f"{missing} of {input_ids.shape[0]} prompts hold no image token (id {token}) after the processor: "
            "the model would answer without looking at the image. Use the processor saved with the model "
            "(its image token must match the model's config)"
        )


def _right_pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding (``mask == 0``) to its end, keeping the order of the real tokens: (B, L) each."""
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
    return ids.gather(1, order), mask.gather(1, order)


def _answer_tokens(model: Any, out: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The new tokens in ``generate``'s output ``out`` (B, T) -> (B, T'), checked against what transformers
    5.x returns: a decoder-only language model (LLaVA; BLIP-2 / InstructBLIP with OPT / Llama) gives the prompt
    followed by the new tokens (T = L + n); an encoder-decoder one (Flan-T5) gives only the decoder's tokens,
    the decoder start token first (T = 1 + n)."""
    start = decoder_start_token_id(model)
    if start is not None:
        if not bool((out[:, 0] == start).all()):
            raise RuntimeError(f"encoder-decoder generate did not start with the decoder start token {start}: "
                               f"got {out[:, 0].tolist()}")
        return out[:, 1:]
    prompt_len = input_ids.shape[1]
    if out.shape[1] < prompt_len or not torch.equal(out[:, :prompt_len], input_ids):
        raise RuntimeError("decoder-only generate did not return the prompt before the answer (this code expects "
                           "transformers 5.x behaviour); cannot tell the answer tokens apart")
    return out[:, prompt_len:]


def generate_answers(model: Any, processor: Any, rows: Sequence[VQARow], batch_size: int = 32,
                     max_new_tokens: int = 5, prompt: str | None = None, progress: bool = False) -> list[str]:
    """Greedy answers to ``rows``; each answer is the decoded text of the new tokens up to EOS.

    Batches are padded as the language model needs, so that an answer does not depend on the batch: on the
    left for a decoder-only language model (generation appends on the right), on the right for an
    encoder-decoder one (the decoder starts fresh; right padding keeps the T5 encoder's relative positions as
    without padding). InstructBLIP's Q-Former instruction (``qformer_input_ids``) is always right-padded
    (the Q-Former has absolute positions), whatever its tokenizer's padding side.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    template = prompt if prompt is not None else default_prompt(processor)
    if "{question}" not in template:
        raise ValueError(f"prompt must contain '{{question}}', got {template!r}")
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right" if decoder_start_token_id(model) is not None else "left"
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    answers: list[str] = []
    try:
        # float32 CPU linears on oneDNN where it measures faster (kernels.cpu_gemm)
        with cpu_gemm.onednn_linears(model):
            for start in tqdm(range(0, len(rows), batch_size), desc="generate", disable=not progress, leave=False):
                part = rows[start:start + batch_size]
                texts = [template.format(question=r.question) for r in part]
                inputs = processor(images=[_open_image(r.image) for r in part], text=texts, padding=True,
                                   return_tensors="pt")
                inputs = {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
                          for k, v in inputs.items()}
                if "qformer_input_ids" in inputs and "qformer_attention_mask" in inputs:
                    inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = _right_pad(
                        inputs["qformer_input_ids"], inputs["qformer_attention_mask"])
                _check_image_tokens(model, inputs["input_ids"])
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
                new = _answer_tokens(model, out, inputs["input_ids"])
                answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers
