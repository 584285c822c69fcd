"""Writing a file so that a reader, or a kill mid-write, never sees half of it."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """``write`` into a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text (reports, JSON, CSV)."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_csv(path: str | os.PathLike, rows: Iterable[Sequence[Any]]) -> Path:
    """:func:`atomic_write_text` of CSV rows (the header first), as :mod:`csv` writes them."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return atomic_write_text(path, buffer.getvalue())
