"""Slim export for shipping, and the shipped pretrained model working out of the box."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xray.core.checkpoint_io import load_checkpoint_file
from xray.inference.checkpoints import export_for_inference, load_model
from xray.inference.predictor import PRETRAINED_PATH


@pytest.mark.parametrize("half", [False, True])
def test_export_for_inference_keeps_predictions(trained_run: Path, tmp_path: Path, half: bool) -> None:
    src = trained_run / "checkpoints" / "best_xray_model.ckpt"
    dst = export_for_inference(src, tmp_path / "slim.ckpt", half=half)
    assert dst.stat().st_size < src.stat().st_size
    assert "optimizer_states" not in load_checkpoint_file(dst)
    x = torch.rand(4, 1, 48, 48)
    full, slim = load_model(src), load_model(dst)
    plain = lambda meta: {k: v for k, v in meta.items() if k != "ood"}  # noqa: E731  (ood holds tensors)
    assert plain(slim.meta) == plain(full.meta)
    assert slim.ood is not None and torch.equal(slim.ood.components, full.ood.components)
    with torch.inference_mode():
        torch.testing.assert_close(slim.net(x), full.net(x), atol=1e-2 if half else 0, rtol=0)


@pytest.mark.skipif(not PRETRAINED_PATH.exists(), reason="no shipped model yet")
def test_shipped_model_predicts_out_of_the_box(tmp_path: Path) -> None:
    """``predict.py ckpt=pretrained`` as a user runs it: the shipped ensemble, within the size budget."""
    import csv

    from PIL import Image

    from tests.conftest import synthetic_xray
    from tests.helpers import run_script
    from xray.inference.predictor import load_predictor

    files = [PRETRAINED_PATH] if PRETRAINED_PATH.is_file() else list(PRETRAINED_PATH.iterdir())
    assert sum(f.stat().st_size for f in files) <= 50 * 1024 * 1024
    predictor = load_predictor("pretrained")
    assert predictor.threshold != 0.5 and predictor.temperature > 0  # chosen out of fold, travels with it
    rng = __import__("numpy").random.default_rng(0)
    for i in range(3):
        Image.fromarray(synthetic_xray(i % 2, 300, rng)).save(tmp_path / f"film{i}.png")
    proc = run_script("predict.py", ["ckpt=pretrained", f"input={tmp_path}", f"output={tmp_path / 'p.csv'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))  # noqa: SIM115
    assert len(rows) == 3 and all(0.0 <= float(r["prob_pneumonia"]) <= 1.0 and not r["error"] for r in rows)


@pytest.mark.slow
@pytest.mark.skipif(not PRETRAINED_PATH.is_dir(), reason="no shipped model folder")
def test_a_non_editable_install_finds_the_shipped_model(tmp_path: Path) -> None:
    """``pip install .`` (not editable) carries the shipped model, and ``ckpt=pretrained`` finds it from
    any working directory: a wheel of this checkout, installed with its own prefix, imported alone."""
    import shutil
    import subprocess
    import sys
    import sysconfig
    import zipfile

    from tests.conftest import PROJECT_ROOT
    from xray.inference.predictor import PRETRAINED_NAME

    source = tmp_path / "source"  # build from a copy: setuptools writes build/ and egg-info beside it
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    shutil.copytree(
        PROJECT_ROOT / "src" / "xray", source / "src" / "xray", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(PROJECT_ROOT / "models", source / "models")
    shutil.copytree(PROJECT_ROOT / "conf", source / "conf")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"), str(source)],
        check=True,
    )
    (wheel,) = (tmp_path / "w").glob("xray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(f"data/share/xray/models/{PRETRAINED_NAME}/ensemble.json") for n in names), names[
        -10:
    ]
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip first uninstalls this environment's own (editable) xray
    install = [*pip, "install", "--no-deps", "--no-index", "--ignore-installed", "--prefix", str(prefix)]
    subprocess.run([*install, str(wheel)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    probe = "import xray.inference.predictor as p; print(p.__file__); print(p.load_predictor('pretrained').source)"
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(site)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    module_file, shipped = proc.stdout.split("\n")[:2]
    assert Path(module_file).is_relative_to(site)  # the installed copy, not this checkout
    assert f"{prefix}/share/xray/models/{PRETRAINED_NAME}" in shipped
    # python -m xray.ood composes conf/ood.yaml from the installed copy of conf/ (cli.CONFIG_DIR)
    tool = subprocess.run(
        [sys.executable, "-m", "xray.ood", "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(site)},
    )  # fmt: skip
    assert tool.returncode == 0 and "n_family:" in tool.stdout, tool.stderr[-2000:]
    check = subprocess.run(
        [sys.executable, "-c", "import xray"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr[-2000:]  # this environment's own install is untouched


def test_every_config_group_is_installed_with_the_package() -> None:
    """pyproject's data-files list each conf/ folder (setuptools globs do not recurse): a new group
    left out would be missing after ``pip install .``."""
    import tomllib

    from tests.conftest import PROJECT_ROOT

    data_files = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"
    ]
    folders = ["conf"] + sorted(f"conf/{d.name}" for d in (PROJECT_ROOT / "conf").iterdir() if d.is_dir())
    for folder in folders:
        assert data_files.get(f"share/xray/{folder}") == [f"{folder}/*.yaml"], folder
        assert not [d for d in (PROJECT_ROOT / folder).iterdir() if d.is_dir() and folder != "conf"], folder
