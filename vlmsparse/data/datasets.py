"""Training data for finetuning: LLaVA-style conversations, caption JSONL, the synthetic VQA set.

Every dataset yields examples encoded the same way (``encode_example``)::

    input_ids       [L]  long   prompt tokens (image tokens included, as the processor expands them) + answers
    attention_mask  [L]  long   all ones (padding comes in the collator)
    labels          [L]  long   = input_ids on answer tokens (and the EOS closing each answer), -100 elsewhere
    pixel_values    [3, H, W]   from the model's processor; absent for a text-only example
    (other 1-row outputs of the processor, e.g. InstructBLIP's ``qformer_input_ids``, passed through)

so the loss is computed on answer tokens only: never on the prompt, the image tokens or the padding.

Text-only examples (``Example.image is None``: conversation rows without ``"image"``) are encoded with the
same template without the ``<image>`` placeholder, through the tokenizer (BOS as it adds it), and have no
``pixel_values``. A LLaVA model trains on batches mixing them with image examples (its forward matches the
image tokens to the images given); BLIP-2 / InstructBLIP put query tokens in every row, so they need an image
in every example. A language model alone (Llama / OPT) takes its tokenizer as the "processor": all its data
must be text (rows with images, caption JSONL and the synthetic set are refused).

Encoder-decoder language models (BLIP-2 / InstructBLIP with Flan-T5; ``decoder_start_token_id`` given) get
the prompt on the encoder side and the answer on the decoder side::

    input_ids, attention_mask        [Le]  image tokens + every turn up to the last answer (earlier answers
                                           are context)
    decoder_input_ids                [Ld]  decoder start token + the last answer + EOS
    decoder_attention_mask           [Ld]  all ones
    labels                           [Ld]  = decoder_input_ids with the start token set to -100

so position ``i`` of the decoder logits predicts label ``i + 1``, as for a decoder-only model: one loss
(:mod:`vlmsparse.training.losses`) serves both.

Formats:

- conversation JSON (LLaVA): a JSON list of ``{"image": "rel/path.jpg", "conversations": [{"from": "human",
  "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "A cat."}, ...]}``; turns alternate human/gpt;
  a row without ``"image"`` (absent or null) is text-only.
- caption JSONL: one ``{"image": "rel/path.jpg", "caption": "..."}`` per line (``"text"`` is accepted for
  ``"caption"``); the prompt is a fixed caption instruction.
- synthetic: scenes and questions from :mod:`vlmsparse.data.synthetic` (no files).
- text (:class:`TextWindowDataset`): a ``.txt`` file, a folder of them or a ``datasets`` folder (the sources of
  text calibration), for language modelling: consecutive windows of ``max_length`` tokens (default
  ``TEXT_WINDOW``), every token a label, as the LoRA recovery of Wanda / SparseGPT trains on C4.

The processor is the model's (``AutoProcessor``): called as ``processor(images=img, text=prompt,
return_tensors="pt")`` for the first prompt segment, ``processor.tokenizer(text, add_special_tokens=False)``
for the rest. LLaVA-style processors expand an ``<image>`` placeholder in the text; processors with a
``num_query_tokens`` attribute (BLIP-2 / InstructBLIP) prepend the image tokens themselves, so the placeholder
is removed from the text for them. A plain tokenizer (no ``image_processor``) stands for a language model alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .calibration import TEXT_EXTENSIONS
from .records import DataFormatError, iter_jsonl, load_image

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "DataFormatError",
    "encode_example",
    "ConversationDataset",
    "CaptionDataset",
    "ExampleDataset",
    "SyntheticVQADataset",
    "VLMCollator",
    "load_dataset",
    "load_image",
    "image_token_id",
]

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
CAPTION_PROMPT = "A short image caption:"


@dataclass(frozen=True)
class Example:
    """One raw example: an image (path or PIL image; None for a text-only example) and alternating
    ``(role, text)`` turns, role ``"human"`` or ``"gpt"``; ``source`` names where it came from for error messages."""

    image: Any
    turns: tuple[tuple[str, str], ...]
    source: str = ""


# --------------------------------------------------------------------------------------------- encoding
def _template(processor: Any) -> tuple[str, str, bool]:
    """(user prefix, assistant prefix, placeholder-in-text) for the processor's family."""
    if hasattr(processor, "num_query_tokens"):  # BLIP-2 / InstructBLIP: image tokens prepended by the processor
        return "Question: ", " Answer:", False
    return "USER: ", " ASSISTANT:", True


def _takes_images(processor: Any) -> bool:
    """False for a plain tokenizer standing for a language model alone (no ``image_processor``)."""
    return hasattr(processor, "image_processor")


def image_token_id(processor: Any) -> int | None:
    """The id of the processor's image token (``<image>``), None for a plain tokenizer or a processor without one."""
    if not _takes_images(processor):
        return None
    found = getattr(processor, "image_token_id", None)
    if found is not None:
        return int(found)
    token = getattr(processor, "image_token", None)
    return None if token is None else int(processor.tokenizer.convert_tokens_to_ids(str(token)))


def _check_image(processor: Any, has_image: bool, source: str) -> None:
    """DataFormatError when the example's image (or its absence) does not suit the processor."""
    if has_image and not _takes_images(processor):
        raise DataFormatError(f"{source}: the example has an image, but the processor is a tokenizer alone (a "
                              "language model alone trains on text): give text-only rows (no 'image'), or "
                              "finetune a vision-language model")
    if not has_image and hasattr(processor, "num_query_tokens"):
        raise DataFormatError(f"{source}: the example has no image, but a BLIP-2 / InstructBLIP processor puts "
                              "query tokens in every row: every example needs an image (text-only rows are for "
                              "LLaVA or a language model alone)")


def _token_ids(processor: Any, text: str) -> list[int]:
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def encode_example(processor: Any, example: Example, max_length: int | None = None,
                   decoder_start_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenise ``example`` into ``input_ids``/``attention_mask``/``labels`` ``[L]`` and ``pixel_values``.

    Layout: ``USER: <image>\\n{q1} ASSISTANT: {a1}</s> USER: {q2} ASSISTANT: {a2}</s>`` (LLaVA family) or
    ``<image tokens>Question: {q1} Answer: {a1}</s> ...`` (processors with ``num_query_tokens``). A text-only
    example (``image`` None; LLaVA processor or a plain tokenizer) is ``<s>USER: {q1} ASSISTANT: {a1}</s> ...``
    with no ``pixel_values``; an image with a plain tokenizer, or no image with a BLIP-2 / InstructBLIP
    processor, is a :class:`DataFormatError`.
    Labels keep the answer tokens and each answer's EOS; the prompt, image tokens are ``-100``.
    ``max_length`` truncates from the end (the image tokens must fit, else :class:`DataFormatError`).
    ``decoder_start_token_id`` (encoder-decoder language models): the last answer goes to the decoder side
    (``decoder_input_ids``, labels aligned with them; see the module docstring); ``max_length`` then bounds
    each side.
    """
    turns = example.turns
    if not turns or turns[0][0] != "human":
        raise DataFormatError(f"{example.source}: a conversation must start with a 'human' turn")
    image = example.image
    _check_image(processor, image is not None, example.source)
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, example.source)
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the processor's tokenizer has no eos_token_id; answers must end with EOS")
    if decoder_start_token_id is not None:
        return _encode_encoder_decoder(processor, example, image, max_length, decoder_start_token_id, eos)
    ids, labels, inputs = _encode_turns(processor, turns, image, example.source, eos)
    ids, labels = _truncate(processor, ids, max_length, example.source), labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataFormatError(
            f"{example.source}: no answer token left to train on (no 'gpt' turn, or max_length={max_length} cut it)"
        )
    input_ids = torch.tensor(ids, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.tensor(labels, dtype=torch.long),
        **inputs,
    }


def _encode_turns(processor: Any, turns: tuple[tuple[str, str], ...], image: Any, source: str,
                  eos: int) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
    """``(ids, labels, image inputs)`` of the decoder-only layout; the image inputs are ``pixel_values`` and
    the processor's other per-example outputs (e.g. InstructBLIP's ``qformer_input_ids``), none when ``image``
    is None (the first prompt then goes through the tokenizer with its special tokens: BOS)."""
    user, assistant, placeholder_in_text = _template(processor)
    ids: list[int] = []
    labels: list[int] = []
    inputs: dict[str, torch.Tensor] = {}
    for index, (role, text) in enumerate(turns):
        expected = "human" if index % 2 == 0 else "gpt"
        if role != expected:
            raise DataFormatError(f"{source}: turn {index} is {role!r}, expected {expected!r} (turns alternate)")
        if role == "human":
            question = text.replace(IMAGE_PLACEHOLDER, "").strip()
            if index == 0 and image is None:
                tokenizer = getattr(processor, "tokenizer", processor)
                segment = list(tokenizer(f"{user}{question}{assistant}")["input_ids"])
            elif index == 0:
                prompt = f"{user}{IMAGE_PLACEHOLDER}\n{question}{assistant}" if placeholder_in_text else f"{user}{question}{assistant}"
                out = processor(images=image, text=prompt, return_tensors="pt")
                segment = out["input_ids"][0].tolist()
                pixels = out["pixel_values"]
                # 2-D: already the image's patches [P, D] with no batch dimension (Qwen2-VL); else [1, ...]
                inputs["pixel_values"] = pixels if pixels.dim() == 2 else pixels[0]
                # the processor's other per-example outputs, batch dimension dropped: InstructBLIP's
                # qformer_input_ids, Qwen2-VL's image_grid_thw, LLaVA-NeXT's image_sizes, Mllama's aspect_ratio_ids
                inputs.update({k: v[0] for k, v in out.items() if k not in ("input_ids", "attention_mask", "pixel_values")
                               and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == 1})
            else:
                segment = _token_ids(processor, f" {user}{question}{assistant}")
            ids += segment
            labels += [IGNORE_INDEX] * len(segment)
        else:
            segment = _token_ids(processor, f" {text.strip()}") + [eos]
            ids += segment
            labels += segment
    return ids, labels, inputs


def _truncate(processor: Any, ids: list[int], max_length: int | None, source: str) -> list[int]:
    """``ids[:max_length]``; DataFormatError when that cuts image tokens (the model needs all of them)."""
    if max_length is None or len(ids) <= max_length:
        return ids
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token = getattr(processor, "image_token", None)
    image_id = tokenizer.convert_tokens_to_ids(image_token) if image_token is not None else None
    needed = max((i + 1 for i, t in enumerate(ids) if t == image_id), default=0)
    if needed > max_length:
        raise DataFormatError(f"{source}: max_length={max_length} cuts the image tokens (the prompt needs at least "
                              f"{needed} tokens); raise max_length")
    return ids[:max_length]


def _encode_encoder_decoder(processor: Any, example: Example, image: Any, max_length: int | None,
                            decoder_start_token_id: int, eos: int) -> dict[str, torch.Tensor]:
    """The encoder-decoder layout of :func:`encode_example`: the turns before the last answer, encoded as the
    decoder-only layout would (earlier answers are context), for the encoder; the last answer + EOS, after
    the decoder start token, for the decoder."""
    turns = example.turns
    answered = [i for i, (role, _) in enumerate(turns) if role == "gpt"]
    if not answered:
        raise DataFormatError(f"{example.source}: no 'gpt' turn: nothing to train on")
    last = answered[-1]
    ids, _, inputs = _encode_turns(processor, turns[:last], image, example.source, eos)
    encoder = torch.tensor(_truncate(processor, ids, max_length, example.source), dtype=torch.long)
    decoder = torch.tensor([decoder_start_token_id] + _token_ids(processor, turns[last][1].strip()) + [eos],
                           dtype=torch.long)
    if max_length is not None:
        decoder = decoder[:max_length]
    if decoder.numel() < 2:
        raise DataFormatError(f"{example.source}: no answer token left to train on (max_length={max_length})")
    labels = decoder.clone()
    labels[0] = IGNORE_INDEX
    return {
        "input_ids": encoder,
        "attention_mask": torch.ones_like(encoder),
        "decoder_input_ids": decoder,
        "decoder_attention_mask": torch.ones_like(decoder),
        "labels": labels,
        **inputs,
    }


class ExampleDataset(Dataset):
    """A list of :class:`Example` encoded on access with the model's processor (``decoder_start_token_id``:
    the encoder-decoder layout of :func:`encode_example`, for Flan-T5 language models)."""

    def __init__(self, examples: Sequence[Example], processor: Any, max_length: int | None = None,
                 decoder_start_token_id: int | None = None) -> None:
        if len(examples) == 0:
            raise ValueError("dataset is empty: no example to train on")
        self.examples = list(examples)
        self.processor = processor
        self.max_length = max_length
        self.decoder_start_token_id = decoder_start_token_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return encode_example(self.processor, self.examples[index], self.max_length, self.decoder_start_token_id)


# ---------------------------------------------------------------------------------------------- parsers
def _optional_image_path(row: dict, image_root: Path, source: str, processor: Any) -> Path | None:
    """The row's image path, None for a text-only row (``"image"`` absent or null); DataFormatError for an
    image a tokenizer alone cannot take, or a ``<image>`` placeholder in a row without an image."""
    if row.get("image") is None:
        if any(IMAGE_PLACEHOLDER in turn["value"] for turn in row["conversations"]):
            raise DataFormatError(f"{source}: a turn has the {IMAGE_PLACEHOLDER} placeholder but the row has no "
                                  "'image'; give the image path, or remove the placeholder for a text-only row")
        return None
    _check_image(processor, True, source)
    return _image_path(row["image"], image_root, source)


def _image_path(value: Any, image_root: Path, source: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DataFormatError(f"{source}: 'image' must be a non-empty string path, got {value!r}")
    path = Path(value)
    path = path if path.is_absolute() else image_root / path
    if not path.exists():
        raise DataFormatError(f"{source}: image file {str(path)!r} does not exist")
    return path


def _element_lines(text: str) -> list[int]:
    """1-based line where each top-level element of a JSON array starts (for error messages)."""
    decoder = json.JSONDecoder()
    lines: list[int] = []
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)


class ConversationDataset(ExampleDataset):
    """LLaVA-style conversation JSON (see the module docstring); images relative to ``image_root``
    (default: the JSON file's folder); rows without ``"image"`` are text-only. Rows are checked on
    construction: a row that does not parse, or whose image (or its absence) does not suit the processor
    (a tokenizer alone takes text only; BLIP-2 / InstructBLIP need images), raises :class:`DataFormatError`
    naming the file, the row and its line."""

    def __init__(self, path: str | os.PathLike, processor: Any, image_root: str | os.PathLike | None = None,
                 max_length: int | None = None, decoder_start_token_id: int | None = None) -> None:
        path = Path(path)
        image_root = Path(image_root) if image_root is not None else path.parent
        text = path.read_text(encoding="utf-8")
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
        if not isinstance(rows, list):
            raise DataFormatError(f"{path}: a conversation file holds a JSON list of rows, got {type(rows).__name__}")
        lines = _element_lines(text)
        examples = []
        for index, row in enumerate(rows):
            source = f"{path}:{lines[index]} (row {index})"
            if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
                raise DataFormatError(f"{source}: a row needs a 'conversations' list of {{from, value}} turns "
                                      "(and 'image' unless it is text-only)")
            turns = []
            for turn in row["conversations"]:
                if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or not isinstance(turn.get("value"), str):
                    raise DataFormatError(f"{source}: each turn needs 'from' ('human' or 'gpt') and a string 'value', got {turn!r}")
                turns.append((turn["from"], turn["value"]))
            if len(turns) < 2:
                raise DataFormatError(f"{source}: a conversation needs a 'human' turn followed by a 'gpt' turn")
            image = _optional_image_path(row, image_root, source, processor)
            if image is None:
                _check_image(processor, False, source)
            examples.append(Example(image, tuple(turns), source))
        super().__init__(examples, processor, max_length, decoder_start_token_id)


class CaptionDataset(ExampleDataset):
    """Caption JSONL: one ``{"image": ..., "caption": ...}`` per line (blank lines skipped); the prompt is
    ``prompt`` (a caption instruction). Every line needs an image (a tokenizer alone is refused). A line that
    does not parse raises :class:`DataFormatError` with its number."""

    def __init__(self, path: str | os.PathLike, processor: Any, image_root: str | os.PathLike | None = None,
                 prompt: str = CAPTION_PROMPT, max_length: int | None = None,
                 decoder_start_token_id: int | None = None) -> None:
        path = Path(path)
        image_root = Path(image_root) if image_root is not None else path.parent
        examples = []
        for source, row in iter_jsonl(path):
            caption = row.get("caption", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(caption, str) or not caption.strip():
                raise DataFormatError(f"{source}: a row needs 'image' and a non-empty string 'caption' (or 'text')")
            _check_image(processor, True, source)
            image = _image_path(row.get("image"), image_root, source)
            examples.append(Example(image, (("human", prompt), ("gpt", caption)), source))
        super().__init__(examples, processor, max_length, decoder_start_token_id)


class SyntheticVQADataset(ExampleDataset):
    """``num`` synthetic scenes with one question each, from :mod:`vlmsparse.data.synthetic` (every example
    has an image: a tokenizer alone is refused)."""

    def __init__(self, processor: Any, num: int = 64, seed: int = 0, max_length: int | None = None,
                 decoder_start_token_id: int | None = None) -> None:
        from . import synthetic

        if not _takes_images(processor):
            raise ValueError("the synthetic data set is image-text; the processor is a tokenizer alone (a language "
                             "model alone trains on text): give a conversation JSON of text-only rows")
        samples = synthetic.make_vqa_samples(num, seed=seed)
        examples = [Example(s.image, (("human", s.question), ("gpt", s.answer)), f"synthetic[{i}]")
                    for i, s in enumerate(samples)]
        super().__init__(examples, processor, max_length, decoder_start_token_id)


TEXT_WINDOW = 512  # tokens per window of a text data set when max_length is not given


class TextWindowDataset(Dataset):
    """Language modelling on a text source (see :func:`vlmsparse.data.calibration.load_calibration_text`): the
    documents joined by blank lines and tokenized without special tokens, cut into consecutive windows of
    ``max_length`` tokens (the rest dropped). Each example: ``input_ids [L]``, ``attention_mask [L]`` of ones,
    ``labels [L] = input_ids`` (every token is scored; the loss shifts by one). For decoder-only models taking
    text rows (a language model alone, LLaVA-style VLMs); ValueError for an encoder-decoder language model or a
    BLIP-2 / InstructBLIP processor, and for a text shorter than one window."""

    def __init__(self, path: str | os.PathLike, processor: Any, max_length: int | None = None,
                 decoder_start_token_id: int | None = None) -> None:
        from .calibration import load_calibration_text, text_token_ids

        if decoder_start_token_id is not None:
            raise ValueError(f"data {str(path)!r}: a text corpus trains a decoder-only language model; an "
                             "encoder-decoder one (Flan-T5) needs prompt / answer pairs: give a conversation JSON")
        if hasattr(processor, "num_query_tokens"):
            raise ValueError(f"data {str(path)!r}: a BLIP-2 / InstructBLIP processor puts query tokens in every "
                             "row, so every example needs an image; a text corpus suits a language model alone "
                             "or LLaVA")
        self.max_length = max_length or TEXT_WINDOW
        ids = text_token_ids(load_calibration_text(path), processor)
        count = len(ids) // self.max_length
        if count == 0:
            raise ValueError(f"data {str(path)!r} holds {len(ids)} tokens, fewer than one window of max_length="
                             f"{self.max_length}; give more text or a smaller max_length (--max-length)")
        self.windows = ids[: count * self.max_length].reshape(count, -1)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.windows[index]
        return {"input_ids": window.clone(), "attention_mask": torch.ones_like(window), "labels": window.clone()}


def load_dataset(spec: str, processor: Any, image_root: str | None = None, max_length: int | None = None,
                 num_synthetic: int = 64, seed: int = 0, decoder_start_token_id: int | None = None) -> Dataset:
    """A dataset from a spec: ``synthetic`` (or ``synthetic:N``), a ``.jsonl`` caption file, a ``.json``
    conversation file, or text (a ``.txt`` file, a folder of them or a ``datasets`` folder:
    :class:`TextWindowDataset`); ``decoder_start_token_id`` for an encoder-decoder language model (see
    :func:`encode_example`)."""
    options = dict(max_length=max_length, decoder_start_token_id=decoder_start_token_id)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        count = spec.split(":", 1)[1].strip() if ":" in spec else str(num_synthetic)
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"data {spec!r}: synthetic:N needs an integer N >= 1 (the number of examples)")
        num = int(count)
        return SyntheticVQADataset(processor, num=num, seed=seed, **options)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"data {spec!r}: no such file (allowed: a .json conversation file, a .jsonl "
                                "caption file, a .txt file or folder of text, 'synthetic' or 'synthetic:N')")
    if path.is_dir() or path.suffix.lower() in TEXT_EXTENSIONS:
        return TextWindowDataset(path, processor, max_length, decoder_start_token_id)
    if path.suffix == ".jsonl":
        return CaptionDataset(path, processor, image_root, **options)
    if path.suffix == ".json":
        return ConversationDataset(path, processor, image_root, **options)
    raise ValueError(f"data {spec!r}: unknown format {path.suffix!r} (allowed: .json conversations, .jsonl captions, "
                     ".txt text or a folder of text, 'synthetic' or 'synthetic:N')")


# -------------------------------------------------------------------------------------------- collator
@dataclass
class VLMCollator:
    """Pad a list of encoded examples on the right into a batch: each per-token key to its own longest length
    (``input_ids`` / ``decoder_input_ids`` with the pad id, ``labels`` with -100, the rest, attention masks
    and e.g. ``qformer_input_ids``, with 0): ``[B, Lmax]``; a key with more dimensions per example (``[L, ...]``:
    Mllama's ``cross_attention_mask``, Idefics3's ``pixel_attention_mask``) is padded along its first dimension
    with 0 and stacked: ``[B, Lmax, ...]``; ``pixel_values`` of the examples that have one stacked in row order:
    ``[B_img, 3, H, W]`` (no key when no example has an image), or with ``flat_images`` (Qwen2-VL: each example
    holds its image's patches ``[P_i, D]``) concatenated: ``[sum P_i, D]``.

    A batch may mix examples with and without an image, as LLaVA takes it (its forward matches the image
    tokens to the images given). Refused, naming the row (ValueError): a mixed batch whose image examples are
    laid out for BLIP-2 / InstructBLIP (query tokens first, or Q-Former inputs: every row needs an image); an
    example without an image that holds image tokens (``image_token_id``, when given); a key that some rows
    lack.
    """

    pad_token_id: int
    image_token_id: int | None = None
    flat_images: bool = False

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pad_values = {"input_ids": self.pad_token_id, "decoder_input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        self._check_images(features)
        batch: dict[str, torch.Tensor] = {}
        images = [f["pixel_values"] for f in features if f.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.cat(images) if self.flat_images else torch.stack(images)
        keys = [k for k in dict.fromkeys(k for f in features for k, v in f.items() if v is not None)
                if k != "pixel_values"]
        for key in keys:
            for row, f in enumerate(features):
                if f.get(key) is None:
                    raise ValueError(f"collate: row {row} has no {key!r}, another row has; every example of a batch "
                                     "needs the same keys (apart from pixel_values)")
            first = features[0][key]
            if first.dim() > 1:  # [L, ...] per example: pad along L
                if any(f[key].shape[1:] != first.shape[1:] for f in features):
                    raise ValueError(f"collate: {key!r} has shapes {[tuple(f[key].shape) for f in features]}; "
                                     "the examples may differ in the first dimension only")
                width = max(f[key].shape[0] for f in features)
                batch[key] = first.new_zeros((len(features), width, *first.shape[1:]))
                for row, f in enumerate(features):
                    batch[key][row, : f[key].shape[0]] = f[key]
                continue
            width = max(f[key].numel() for f in features)
            batch[key] = torch.full((len(features), width), pad_values.get(key, 0), dtype=first.dtype)
            for row, f in enumerate(features):
                batch[key][row, : f[key].numel()] = f[key]
        return batch

    def _check_images(self, features: list[dict[str, torch.Tensor]]) -> None:
        has_image = [f.get("pixel_values") is not None for f in features]
        if self.image_token_id is not None:
            for row, (f, image) in enumerate(zip(features, has_image, strict=True)):
                count = int((f["input_ids"] == self.image_token_id).sum())
                if not image and count:
                    raise ValueError(f"collate: row {row} has no image but {count} image tokens (id "
                                     f"{self.image_token_id}); an example without an image must be text only")
        if all(has_image) or not any(has_image):
            return
        text_row = has_image.index(False)
        for f in (f for f, image in zip(features, has_image, strict=True) if image):
            query_first = self.image_token_id is not None and int(f["input_ids"][0]) == self.image_token_id
            if query_first or any(key.startswith("qformer_") for key in f):
                raise ValueError(f"collate: row {text_row} has no image, but the batch's image examples are laid "
                                 "out for BLIP-2 / InstructBLIP (query tokens in every row): every example needs "
                                 "an image; mixing text-only and image examples works for LLaVA only")
