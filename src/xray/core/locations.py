"""Where the project's ``conf/`` and ``models/`` are: in a source checkout (editable installs), or where
``pip install .`` puts them (pyproject's data-files: ``PREFIX/share/xray/``)."""

from __future__ import annotations

import sys
from pathlib import Path


def candidates(relative: str) -> list[Path]:
    """``relative`` (e.g. ``conf``) in the checkout, then under ``share/xray`` of the prefix this package
    is installed in, then of the running interpreter's prefix; in that order, without repeats."""
    package = Path(__file__).resolve().parents[1]  # .../xray (this file is xray/core/locations.py)
    found = [package.parents[1] / relative]  # the checkout: ROOT/src/xray
    if len(package.parents) > 3:  # PREFIX/lib/pythonX.Y/site-packages/xray
        found.append(package.parents[3] / "share" / "xray" / relative)
    found.append(Path(sys.prefix) / "share" / "xray" / relative)
    return list(dict.fromkeys(found))


def locate(relative: str) -> Path:
    """The first of :func:`candidates` that exists (else the first, for the error message to name)."""
    options = candidates(relative)
    return next((p for p in options if p.exists()), options[0])
