"""Calibration sets for pruning: image-text pairs from files, a folder, or the synthetic generator, batched
into model inputs with the model's processor.

Sources (``load_calibration_samples``):

- a ``.json`` file (a list of records) or ``.jsonl`` file (one record per line). A record names its image
  (``image`` / ``image_path`` / ``file_name``, relative to the file's folder or ``image_root``) and its text
  (``text`` / ``caption`` / ``captions`` (first one) / LLaVA ``conversations``: the turns' ``value`` joined,
  ``<image>`` placeholders dropped). Records without an image are used as text only;
- a folder of images (``.jpg .jpeg .png .bmp .webp``) with captions: ``metadata.jsonl`` (``file_name`` +
  ``text``), ``captions.json`` (``{file name: caption}``), or one ``<image stem>.txt`` beside each image;
- ``"synthetic"``: :func:`vlmsparse.data.synthetic.synthetic_captions` (coloured shapes with captions).

``nsamples`` records are drawn with ``seed`` (all of them, in order, when there are fewer).

Text sources for language models (``load_calibration_text`` + ``text_calibration_batches``, as Wanda /
SparseGPT calibrate): a ``.txt`` file, a folder of ``.txt`` files (no images in it), or a Hugging Face
``datasets`` folder written by ``save_to_disk`` (needs the optional ``datasets`` package; its ``text`` column,
the ``train`` split of a ``DatasetDict``). The documents are joined with ``"\n\n"`` and tokenized once
without special tokens; ``nsamples`` windows of ``seqlen`` tokens start at positions drawn uniformly (with
replacement) from ``[0, n_tokens - seqlen]`` by a ``torch.Generator`` seeded with ``seed``.

Encoder-decoder language models (Flan-T5 in BLIP-2 / InstructBLIP): the text goes to the encoder as for any
model, and the decoder reads it too (``decoder_input_ids`` = start token + the text's tokens + EOS), so both
halves see real text while their statistics are collected. A text window goes to the decoder shifted right
behind the start token (``decoder_input_ids`` = start + the window's tokens but its last), as T5 reads labels.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .records import iter_jsonl, load_image

__all__ = [
    "CalibrationSample",
    "load_calibration_samples",
    "build_calibration_batches",
    "is_text_source",
    "load_calibration_text",
    "text_calibration_windows",
    "text_calibration_batches",
    "default_text_seqlen",
    "IMAGE_EXTENSIONS",
    "TEXT_EXTENSIONS",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TEXT_EXTENSIONS = (".txt",)
_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
_SOURCES = ("a .json/.jsonl file of records, a .txt file, a folder of images with captions, a folder of .txt "
            "files, a Hugging Face datasets folder (save_to_disk), or 'synthetic'")
_IMAGE_KEYS = ("image", "image_path", "file_name", "filename")
_TEXT_KEYS = ("text", "caption", "captions", "conversations")


def _check_count(name: str, value: Any, what: str) -> None:
    """``ValueError`` unless ``value`` is an int >= 1 (``what``: what it counts, for the message)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 ({what}), got {value!r}")


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; ``ValueError`` naming it when it is not UTF-8 or cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot be read: {error.strerror or error}") from None


@dataclass
class CalibrationSample:
    """One image-text pair; ``image`` is a PIL image, a path (loaded lazily), or None (text only)."""

    image: Any
    text: str
    source: str = ""


def _record_text(record: dict, source: str) -> str:
    for key in _TEXT_KEYS:
        value = record.get(key)
        if value is None:
            continue
        if key == "conversations":
            if not isinstance(value, list):
                raise ValueError(f"{source}: 'conversations' must be a list of turns")
            parts = [str(turn.get("value", "")) for turn in value if isinstance(turn, dict)]
            text = " ".join(p.replace("<image>", "").strip() for p in parts)
        elif isinstance(value, list):
            text = str(value[0]) if value else ""
        else:
            text = str(value)
        text = " ".join(text.split())
        if text:
            return text
    raise ValueError(f"{source}: record has no text; expected one of {', '.join(_TEXT_KEYS)}")


def _from_records(records: list, base: Path, source: str, image_root: Path | None) -> list[CalibrationSample]:
    out = []
    for index, record in enumerate(records):
        where = f"{source} record {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        text = _record_text(record, where)
        image = None
        for key in _IMAGE_KEYS:
            if record.get(key):
                image = (image_root or base) / str(record[key])
                break
        out.append(CalibrationSample(image, text, where))
    return out


def _read_records(path: Path) -> list:
    if path.suffix == ".jsonl":
        try:
            return [row for _, row in iter_jsonl(path)]
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        except OSError as error:
            raise ValueError(f"{path}: cannot be read: {error.strerror or error}") from None
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"{path} is empty; expected a JSON list of records")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def _read_captions(path: Path) -> dict:
    """``{image file name: caption}`` from an image folder's ``captions.json`` (``{}`` when there is none)."""
    if not path.exists():
        return {}
    try:
        captions = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from None
    if not isinstance(captions, dict):
        raise ValueError(f"{path}: expected an object {{image file name: caption}}, got {type(captions).__name__}")
    return captions


def _from_folder(folder: Path) -> list[CalibrationSample]:
    metadata = folder / "metadata.jsonl"
    if metadata.exists():
        return _from_records(_read_records(metadata), folder, str(metadata), None)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}), no metadata.jsonl and no "
                         f"{', '.join(TEXT_EXTENSIONS)} files: nothing to calibrate with (calibration sources: {_SOURCES})")
    captions = _read_captions(folder / "captions.json")
    out = []
    for image in images:
        text = captions.get(image.name)
        sidecar = image.with_suffix(".txt")
        if text is None and sidecar.exists():
            text = _read_text(sidecar).strip()
        if not text:
            raise ValueError(
                f"{image}: no caption; give {image.stem}.txt beside it, an entry in captions.json or metadata.jsonl"
            )
        out.append(CalibrationSample(image, " ".join(str(text).split()), str(image)))
    return out


def load_calibration_samples(
    source: str | os.PathLike,
    nsamples: int = 128,
    seed: int = 0,
    image_size: int = 336,
    image_root: str | os.PathLike | None = None,
) -> list[CalibrationSample]:
    """``nsamples`` image-text pairs from ``source`` (a JSON/JSONL file, an image folder or ``"synthetic"``),
    images loaded (a file that fails to load raises ``ValueError`` naming it)."""
    _check_count("nsamples", nsamples, "calibration samples")
    if str(source) == "synthetic":
        from .synthetic import synthetic_captions

        return [CalibrationSample(img, text, f"synthetic {i}")
                for i, (img, text) in enumerate(synthetic_captions(nsamples, seed=seed, image_size=image_size))]
    path = Path(source)
    if path.is_dir():
        samples = _from_folder(path)
    elif path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"{path}: image-text calibration files must be .json or .jsonl, got "
                             f"{path.suffix or 'no suffix'!r}; calibration sources: {_SOURCES}")
        samples = _from_records(_read_records(path), path.parent, str(path),
                                Path(image_root) if image_root else None)
    else:
        raise FileNotFoundError(f"calibration source {str(source)!r} does not exist ({_SOURCES})")
    if not samples:
        raise ValueError(f"calibration source {str(source)!r} holds no samples")
    if len(samples) > nsamples:
        samples = [samples[i] for i in sorted(random.Random(seed).sample(range(len(samples)), nsamples))]
    elif len(samples) < nsamples:
        log.info("calibration source has %d samples (< nsamples=%d); using all", len(samples), nsamples)
    for sample in samples:
        if isinstance(sample.image, Path):
            sample.image = load_image(sample.image, sample.source)
    return samples


def _prompt(processor: Any, text: str, has_image: bool) -> str:
    if not has_image or hasattr(processor, "num_query_tokens"):  # BLIP-2 family: the processor adds image tokens
        return text
    token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {token}\n{text} ASSISTANT:"


def build_calibration_batches(
    samples: list[CalibrationSample], processor: Any, batch_size: int = 8, max_text_length: int | None = None,
    decoder_start_token_id: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Model-input dicts (``input_ids``, ``attention_mask``, ``pixel_values``, ...) of ``batch_size`` samples,
    padded with the processor. ``processor`` may be a tokenizer (language-only models: images ignored).
    ``max_text_length`` truncates the caption to that many words. ``decoder_start_token_id`` (encoder-decoder
    language models) adds ``decoder_input_ids`` / ``decoder_attention_mask`` ``[B, Ld]`` (see the module
    docstring), padded on the right."""
    if not samples:
        raise ValueError("calibration set is empty")
    _check_count("batch_size", batch_size, "calibration samples per forward")
    has_images = hasattr(processor, "image_processor")
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        texts, raw = [], []
        for s in chunk:
            text = " ".join(s.text.split()[:max_text_length]) if max_text_length else s.text
            raw.append(text)
            texts.append(_prompt(processor, text, has_images and s.image is not None))
        if has_images:
            images = [s.image for s in chunk]
            if any(img is None for img in images):
                missing = next(s.source for s in chunk if s.image is None)
                raise ValueError(f"{missing}: a vision-language model needs an image for every calibration sample")
            out = processor(images=images, text=texts, padding=True, return_tensors="pt")
        else:
            out = processor(texts, padding=True, return_tensors="pt")
        batch = {k: v for k, v in dict(out).items() if isinstance(v, torch.Tensor)}
        if decoder_start_token_id is not None:
            batch.update(_decoder_inputs(processor, raw, decoder_start_token_id))
        batches.append(batch)
    return batches


def _decoder_inputs(processor: Any, texts: list[str], start: int) -> dict[str, torch.Tensor]:
    """``decoder_input_ids`` (start + tokens + EOS, right-padded) and ``decoder_attention_mask`` ``[B, Ld]``."""
    tokenizer = getattr(processor, "tokenizer", processor)
    rows = [[start, *tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"decoder_input_ids": ids, "decoder_attention_mask": mask}


# ------------------------------------------------------------------------------------------- text (LMs)
def _is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _DATASET_MARKERS)


def is_text_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` is a text calibration source: a ``.txt`` file, a ``datasets`` folder, or a folder
    holding ``.txt`` files and no images (a folder with images is an image-caption folder)."""
    if str(source) == "synthetic":
        return False
    path = Path(source)
    if path.is_file():
        return path.suffix.lower() in TEXT_EXTENSIONS
    if not path.is_dir():
        return False
    if _is_dataset_folder(path):
        return True
    names = [p for p in path.iterdir() if p.is_file()]
    has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in names) or (path / "metadata.jsonl").exists()
    return not has_images and any(p.suffix.lower() in TEXT_EXTENSIONS for p in names)


def _dataset_texts(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path} is a Hugging Face datasets folder; reading it needs the optional 'datasets' "
                         "package (pip install datasets), or give a .txt file / a folder of .txt files") from None
    try:  # datasets / pyarrow raise many types for a broken folder, some only when the rows are read
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if not data:
                raise ValueError(f"{path}: the DatasetDict holds no split")
            split = "train" if "train" in data else next(iter(data))
            data = data[split]
        column = _text_column(data, path)
        return [str(t) for t in data[column] if t]
    except ValueError as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"{path}: unreadable datasets folder ({type(error).__name__}: {error})") from None
    except Exception as error:  # noqa: BLE001 -- turned into one clear error naming the folder
        raise ValueError(f"{path}: unreadable datasets folder ({type(error).__name__}: {error})") from None


def _text_column(data: Any, path: Path) -> str:
    """The dataset's ``text`` column (it must hold strings), or else its first string column."""
    strings = [name for name, feature in data.features.items()
               if getattr(feature, "dtype", None) in ("string", "large_string")]
    if "text" in data.column_names:
        if "text" not in strings:
            raise ValueError(f"{path}: the dataset's 'text' column holds {data.features['text']}, not strings")
        return "text"
    if not strings:
        raise ValueError(f"{path}: the dataset has no text column (columns: {', '.join(data.column_names)}); "
                         "calibration reads the 'text' column, or else the first string column")
    return strings[0]


def load_calibration_text(source: str | os.PathLike) -> list[str]:
    """The non-empty documents of a text calibration source (see the module docstring), in order: one per
    ``.txt`` file (a folder's files sorted by name) or per dataset row. Raises ``ValueError`` for an unreadable
    or empty source or one of another type, ``FileNotFoundError`` for a missing one."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"calibration source {str(source)!r} does not exist ({_SOURCES})")
    if path.is_file():
        if path.suffix.lower() not in TEXT_EXTENSIONS:
            raise ValueError(f"{path}: text calibration files must be {', '.join(TEXT_EXTENSIONS)}, got "
                             f"{path.suffix or 'no suffix'!r}; calibration sources: {_SOURCES}")
        docs = [_read_text(path)]
    elif _is_dataset_folder(path):
        docs = _dataset_texts(path)
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS)
        if not files:
            raise ValueError(f"{path} holds no {', '.join(TEXT_EXTENSIONS)} files (calibration sources: {_SOURCES})")
        docs = [_read_text(p) for p in files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"calibration source {str(source)!r} is empty (no text)")
    return docs


def text_token_ids(docs: list[str], tokenizer: Any) -> torch.Tensor:
    """``[T]`` long: ``docs`` joined by blank lines and tokenized without special tokens (``tokenizer``: a
    tokenizer or a processor holding one): the token stream that text calibration and text training cut."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def text_calibration_windows(docs: list[str], tokenizer: Any, nsamples: int = 128, seqlen: int = 512,
                             seed: int = 0, source: str = "calibration text") -> torch.Tensor:
    """``input_ids [nsamples, seqlen]``: random windows of the tokenized, concatenated ``docs`` (see the module
    docstring). Raises ``ValueError`` (naming ``source``) when the text holds fewer than ``seqlen`` tokens."""
    _check_count("nsamples", nsamples, "calibration windows")
    _check_count("seqlen", seqlen, "tokens per calibration window")
    ids = text_token_ids(docs, tokenizer)
    if len(ids) < seqlen:
        raise ValueError(f"{source} holds {len(ids)} tokens, fewer than one window of seqlen={seqlen}; "
                         "give more text or a smaller seqlen")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def default_text_seqlen(model_dir: str | os.PathLike) -> int:
    """Tokens per text calibration window for the model in ``model_dir``: its ``max_position_embeddings`` (of
    ``config.json``, or of its ``text_config``), at most 2048, as Wanda / SparseGPT use; 2048 when neither says."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    positions = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
        "max_position_embeddings")
    return min(int(positions), 2048) if positions else 2048


def text_calibration_batches(source: str | os.PathLike, tokenizer: Any, nsamples: int = 128, seqlen: int = 512,
                             seed: int = 0, batch_size: int = 8,
                             decoder_start_token_id: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for a language model from a text source: ``{"input_ids", "attention_mask"}``
    ``[<= batch_size, seqlen]`` (no padding: the mask is all ones), ``nsamples`` windows in all. The counts are
    checked before the source is read. ``decoder_start_token_id`` (an encoder-decoder language model, e.g.
    Flan-T5) adds ``decoder_input_ids`` (the window shifted right behind it) and ``decoder_attention_mask``."""
    _check_count("nsamples", nsamples, "calibration windows")
    _check_count("seqlen", seqlen, "tokens per calibration window")
    _check_count("batch_size", batch_size, "calibration windows per forward")
    windows = text_calibration_windows(load_calibration_text(source), tokenizer, nsamples, seqlen, seed,
                                       source=f"calibration source {str(source)!r}")
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in windows.split(batch_size)]
    if decoder_start_token_id is not None:
        for batch in batches:
            ids = batch["input_ids"]
            start = torch.full_like(ids[:, :1], decoder_start_token_id)
            batch["decoder_input_ids"] = torch.cat([start, ids[:, :-1]], dim=1)
            batch["decoder_attention_mask"] = torch.ones_like(ids)
    return batches
