"""Where the project's ``conf/`` and ``models/`` are: in a source checkout (editable installs), or where
``pip install .`` puts them (pyproject's data-files: ``PREFIX/share/xray/``)."""

from __future__ import annotations

import sys
from pathlib import Path


def candidates(relative: str) -> list[Path]:
    """``relative`` (e.g. ``conf``) in the checkout, then under ``share/xray`` of the prefix this package
    is installed in, then of the running interpreter's prefix; in that order, without repeats."""
    here = Path(__file__).resolve()
    found = [here.parents[2] / relative]
    if len(here.parents) > 4:  # PREFIX/lib/pythonX.Y/site-packages/xray/locations.py
        found.append(here.parents[4] / "share" / "xray" / relative)
    found.append(Path(sys.prefix) / "share" / "xray" / relative)
    return list(dict.fromkeys(found))


def locate(relative: str) -> Path:
    """The first of :func:`candidates` that exists (else the first, for the error message to name)."""
    options = candidates(relative)
    return next((p for p in options if p.exists()), options[0])
