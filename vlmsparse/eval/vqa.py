"""VQAv2-style answer scoring and batched generation evaluation.

Normalisation (the VQAv2 evaluation's rules, written out here): lower case; a punctuation mark is deleted
when it touches a space or in a "1,000"-style number and becomes a space otherwise; a period that is not a
decimal point is deleted; number words become digits ("two" -> "2"); the articles a / an / the are removed;
common contractions missing their apostrophe get it back ("dont" -> "don't"); whitespace collapses.

Accuracy of one prediction against the human answers: ``min(#humans who gave it / 3, 1)`` after
normalising both (``leave_one_out=True`` gives the official average over the 10 subsets of 9 answers).
Exact match: the normalised prediction equals the normalised first (or most common) answer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.records import iter_jsonl, load_image
from ..models import decoder_start_token_id

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "exact_match",
    "VQARow",
    "VQAReport",
    "load_vqa_jsonl",
    "generate_answers",
    "evaluate_vqa",
    "default_prompt",
]

logger = logging.getLogger(__name__)

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "hows": "how's", "id": "i'd",
    "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "lets": "let's",
    "mightnt": "mightn't", "mustnt": "mustn't", "neednt": "needn't", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "weve": "we've", "whats": "what's", "whens": "when's", "wheres": "where's",
    "whos": "who's", "whys": "why's", "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've",
    "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period that is not a decimal point


def _punctuation(text: str) -> str:
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or _DIGIT_COMMA.search(text) is not None:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    return _PERIOD.sub("", text)


def normalize_answer(answer: str) -> str:
    """VQAv2 normalisation of one answer string (see the module docstring)."""
    if not isinstance(answer, str):
        raise ValueError(f"an answer must be a string, got {type(answer).__name__}")
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _punctuation(text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str], leave_one_out: bool = False) -> float:
    """``min(matches / 3, 1)`` with ``matches`` = human answers equal to the prediction (both normalised).
    ``leave_one_out``: the official VQAv2 form, the mean of that over every subset leaving one answer out."""
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one human answer, got none")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if not leave_one_out or len(hits) == 1:
        return min(sum(hits) / 3.0, 1.0)
    total = sum(hits)
    return sum(min((total - h) / 3.0, 1.0) for h in hits) / len(hits)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the normalised most common answer (ties: the first)."""
    if len(answers) == 0:
        raise ValueError("exact_match needs at least one answer, got none")
    normalised = [normalize_answer(a) for a in answers]
    top = Counter(normalised).most_common(1)[0][1]
    best = next(a for a in normalised if normalised.count(a) == top)
    return float(normalize_answer(prediction) == best)


# ------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class VQARow:
    """One question: ``image`` (path or PIL image), ``question``, the human ``answers``, optional ``kind``."""

    image: Any
    question: str
    answers: tuple[str, ...]
    kind: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"{self.source}: 'question' must be a non-empty string, got {self.question!r}")
        if not self.answers or not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"{self.source}: 'answers' must be a non-empty list of strings, got {self.answers!r}")


def load_vqa_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                   limit: int | None = None) -> list[VQARow]:
    """Rows of a JSONL file: ``{"image": "rel/path.png", "question": "...", "answers": ["...", ...]}``
    (``"answer": "..."`` is accepted for one answer; ``"kind"`` optional). Images relative to ``image_root``
    (default: the file's folder); a row that does not parse raises ValueError naming file and line."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (rows to read), got {limit}")
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows = []
    for source, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{source}: a row must be a JSON object with image, question, answers")
        answers = obj.get("answers", [obj["answer"]] if "answer" in obj else None)
        if isinstance(answers, str):
            answers = [answers]
        if answers and isinstance(answers[0], dict):  # VQAv2 style [{"answer": ...}, ...]
            answers = [a.get("answer") for a in answers]
        image = obj.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(f"{source}: 'image' must be a non-empty string path, got {image!r}")
        image_path = Path(image) if Path(image).is_absolute() else root / image
        if not image_path.exists():
            raise FileNotFoundError(f"{source}: image file {str(image_path)!r} does not exist")
        rows.append(VQARow(str(image_path), obj.get("question"), tuple(answers or ()), obj.get("kind"), source))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no rows (expected JSONL lines with image, question, answers)")
    return rows


# ------------------------------------------------------------------------------------------- generation
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


@dataclass
class VQAReport:
    """Scores of one evaluation; ``per_kind`` maps a question kind to its accuracy when rows have kinds."""

    accuracy: float
    exact_match: float
    num: int
    per_kind: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    predictions: list[dict] = field(default_factory=list)

    def to_dict(self, with_predictions: bool = True) -> dict:
        out = {"accuracy": self.accuracy, "exact_match": self.exact_match, "num": self.num,
               "per_kind": self.per_kind, "seconds": round(self.seconds, 3)}
        if with_predictions:
            out["predictions"] = self.predictions
        return out

    def save(self, path: str | os.PathLike) -> Path:
        from ..masks import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2)

        atomic_write(path, write)
        return Path(path)


def score_predictions(rows: Sequence[VQARow], predictions: Sequence[str], leave_one_out: bool = False) -> VQAReport:
    """Score ``predictions`` (one per row) into a :class:`VQAReport`; logs one warning counting the rows with
    fewer than 3 answers (their accuracy cannot exceed ``n / 3``)."""
    if len(rows) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(rows)} rows")
    if not rows:
        raise ValueError("nothing to score: no rows")
    few = Counter(len(row.answers) for row in rows if len(row.answers) < 3)
    if few:
        counts = ", ".join(f"{num} with {n} answer{'s' * (n != 1)}" for n, num in sorted(few.items()))
        logger.warning("%d of %d rows have fewer than 3 answers (%s): VQA accuracy caps at n/3 for a row with n "
                       "answers", sum(few.values()), len(rows), counts)
    records, by_kind = [], {}
    for row, pred in zip(rows, predictions):
        acc = vqa_accuracy(pred, row.answers, leave_one_out)
        image = str(row.image) if isinstance(row.image, (str, os.PathLike)) else None
        records.append({"image": image, "question": row.question, "prediction": pred, "answers": list(row.answers),
                        "accuracy": acc, "exact_match": exact_match(pred, row.answers), "kind": row.kind})
        if row.kind is not None:
            by_kind.setdefault(row.kind, []).append(acc)
    n = len(records)
    return VQAReport(
        accuracy=sum(r["accuracy"] for r in records) / n,
        exact_match=sum(r["exact_match"] for r in records) / n,
        num=n,
        per_kind={k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        predictions=records,
    )


def evaluate_vqa(model: Any, processor: Any, rows: Iterable[VQARow], batch_size: int = 32, max_new_tokens: int = 5,
                 prompt: str | None = None, leave_one_out: bool = False, progress: bool = False) -> VQAReport:
    """Generate answers for ``rows`` and score them (VQA accuracy, exact match, per kind)."""
    rows = list(rows)
    start = time.perf_counter()
    predictions = generate_answers(model, processor, rows, batch_size, max_new_tokens, prompt, progress)
    report = score_predictions(rows, predictions, leave_one_out)
    report.seconds = time.perf_counter() - start
    return report


def evaluate_folder(model_dir: str | os.PathLike, data: str | os.PathLike, batch_size: int = 32,
                    max_new_tokens: int = 5, prompt: str | None = None, limit: int | None = None,
                    image_root: str | None = None, leave_one_out: bool = False, progress: bool = True) -> VQAReport:
    """Load a model folder (Hugging Face files; a pruned or finetuned folder loads the same way) with its
    processor and evaluate it on a VQA JSONL file."""
    model, processor = load_model_folder(model_dir)
    if processor is None or not hasattr(processor, "image_processor"):
        raise ValueError(f"{model_dir}: no image processor saved in the folder (a VQA evaluation needs "
                         "processor_config.json / preprocessor_config.json beside the model)")
    rows = load_vqa_jsonl(data, image_root, limit)
    return evaluate_vqa(model, processor, rows, batch_size, max_new_tokens, prompt, leave_one_out, progress)


def load_model_folder(model_dir: str | os.PathLike) -> tuple[Any, Any]:
    """``(model, processor)`` from a local folder saved with ``save_pretrained`` (eval mode): the model class
    chosen by its ``model_type`` (:func:`vlmsparse.pipeline.save.load_model`); the processor, else the
    tokenizer, saved beside it (None when neither is there)."""
    from ..pipeline.save import load_model, load_processor

    return load_model(model_dir), load_processor(model_dir)
