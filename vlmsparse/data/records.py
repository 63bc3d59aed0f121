"""Reading data files row by row and their images, with errors that name the file and line (layer 4 of docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["DataFormatError", "iter_jsonl", "load_image"]


class DataFormatError(ValueError):
    """A data row that does not parse, or an image that does not load (message names the file and line)."""


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """``(source, row)`` for every non-blank line of a JSONL file, ``source`` being ``"path:line"``.

    A line that is not valid JSON raises :class:`DataFormatError` naming it.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{source}: not valid JSON ({error.msg})") from error


def load_image(path: str | os.PathLike, source: str = "") -> Any:
    """Open ``path`` as an RGB PIL image; a clear :class:`DataFormatError` (naming ``source``) if it fails."""
    from PIL import Image, UnidentifiedImageError

    where = f"{source}: " if source else ""
    if not os.path.exists(path):
        raise DataFormatError(f"{where}image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataFormatError(f"{where}image {str(path)!r} does not load: {error}") from error
