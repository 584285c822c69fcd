"""Shared fixtures: small synthetic Kermany-layout folders (no ../shared needed) and a tiny checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = PROJECT_ROOT.parent / "shared" / "data" / "chest_xray"
REAL_FULLRES = PROJECT_ROOT.parent / "shared" / "data" / "chest_xray_fullres_sample"

os.environ.setdefault("PYTHONHASHSEED", "0")


def synthetic_xray(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A learnable fake film: PNEUMONIA images carry a bright blob, NORMAL ones do not."""
    image = rng.normal(90, 20, (size, size))
    yy, xx = np.mgrid[:size, :size]
    lungs = np.exp(-(((xx - size * 0.5) / (size * 0.35)) ** 2 + ((yy - size * 0.5) / (size * 0.4)) ** 2))
    image += 60 * lungs
    if label == 1:
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        image += 90 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (size * 0.12) ** 2)))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_dataset(
    root: Path,
    per_class: dict[str, int] | None = None,
    size: int = 48,
    seed: int = 0,
    patients_per_class: int = 8,
) -> Path:
    """Kermany layout with Kermany-style names (patients share ids) under ``root``."""
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 24, "val": 4, "test": 6}
    for split, n in per_class.items():
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                patient = i % patients_per_class
                if name == "NORMAL":
                    fname = f"IM-{split[:2]}{patient:02d}-{i:04d}.jpeg"
                else:
                    fname = f"person{split[:2]}{patient:02d}_bacteria_{i:04d}.jpeg"
                fname = fname.replace("tr", "1").replace("va", "2").replace("te", "3")
                Image.fromarray(synthetic_xray(label, size, rng)).save(folder / fname, quality=95)
    return root


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "chest_xray")


@pytest.fixture(scope="session")
def session_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger synthetic dataset shared by the end-to-end tests (read-only)."""
    root = tmp_path_factory.mktemp("data") / "chest_xray"
    return make_dataset(root, {"train": 40, "val": 4, "test": 10}, size=64, patients_per_class=20)


@pytest.fixture(scope="session")
def trained_run(session_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny training run through train.py's code path; returns its run directory."""
    from tests.helpers import run_training

    run_dir = tmp_path_factory.mktemp("runs") / "run"
    run_training(session_dataset, run_dir, ["trainer.max_epochs=2"])
    return run_dir


@pytest.fixture(scope="module")
def best_ckpt(trained_run: Path) -> Path:
    """The best checkpoint of the session's trained run."""
    return trained_run / "checkpoints" / "best_xray_model.ckpt"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_real = pytest.mark.skip(reason=f"real data not found at {REAL_DATA}")
    for item in items:
        if "realdata" in item.keywords and not REAL_DATA.is_dir():
            item.add_marker(skip_real)
