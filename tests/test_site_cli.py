"""``python -m xray.site`` on small synthetic sites, ``predict.py site=`` and ``python -m xray.export site=``:
the profile and report written, applied exactly, refused for another model, and every bad input a
clear error naming the file or row."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import synthetic_xray
from tests.helpers import compose_hydra
from tests.test_ensemble import make_net, raw_logits, save_ckpt
from xray.cli import fail_cleanly
from xray.evaluation.site import SiteFit
from xray.export import run_export
from xray.inference.export import export_model, run_exported
from xray.inference.predict import CSV_COLUMNS, SITE_COLUMN, run_predict
from xray.inference.predictor import load_predictor
from xray.inference.site import (
    SiteProfileError,
    load_site_profile,
    model_fingerprint,
    model_record,
    profile_data,
    write_site_profile,
)
from xray.site import SiteInputError, run_site

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def films(folder: Path, n_normal: int, n_pneumonia: int, seed: int = 0, flat: bool = False) -> Path:
    """Synthetic films in NORMAL/ and PNEUMONIA/ (or all in one flat folder)."""
    rng = np.random.default_rng(seed)
    for label, name, n in ((0, "NORMAL", n_normal), (1, "PNEUMONIA", n_pneumonia)):
        target = folder if flat else folder / name
        target.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(synthetic_xray(label, 40, rng)).save(target / f"{name.lower()}_{i:03d}.png")
    return folder


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_ckpt(tmp_path / "model" / "m.ckpt", make_net(SIZE, 0), temperature=1.3, threshold=0.6)


def site_config(tmp_path: Path, ckpt: Path, folder: Path, *overrides: str) -> Any:
    return compose_hydra(
        "site",
        tmp_path / "run",
        [
            f"ckpt={ckpt}",
            f"input={folder}",
            f"output={tmp_path / 'site.json'}",
            "num_workers=0",
            "n_bootstrap=100",
            *overrides,
        ],
    )


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


# ------------------------------------------------------------------------------------------ the command
def test_command_writes_profile_and_report(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = films(tmp_path / "site", 12, 25)
    assert run_site(site_config(tmp_path, ckpt, folder)) == 0
    printed = capsys.readouterr().out
    profile = load_site_profile(tmp_path / "site.json")
    data = profile.data
    assert profile.fingerprint == model_fingerprint(load_predictor(str(ckpt)))
    assert data["model"]["temperature"] == pytest.approx(1.3) and data["model"]["threshold"] == pytest.approx(
        0.6
    )
    films_ = data["films"]
    assert (films_["n"], films_["n_normal"], films_["n_pneumonia"], films_["n_unlabelled"]) == (37, 12, 25, 0)
    assert films_["labels_from"] == "folders" and len(films_["list"]) == 37
    assert all(len(f["sha256"]) == 64 for f in films_["list"])
    assert {f["label"] for f in films_["list"]} == {"NORMAL", "PNEUMONIA"}
    for name in ("temperature", "prevalence", "threshold"):
        assert len(data["fitted"][name]["ci"]) == 2
    assert data["created"] and data["verdict"]["kind"] and data["site"]["before"]["auroc"] is not None
    assert any("only 12 NORMAL film(s) (fewer than 20)" in w for w in data["warnings"])
    assert not any("PNEUMONIA film(s) (fewer" in w for w in data["warnings"])
    report = tmp_path / "site_report" / "site_report.md"
    text = report.read_text()
    assert "## Verdict" in text and "## The site against the model's validation" in text
    for figure in ("site_calibration_before.png", "site_calibration_after.png", "site_roc.png"):
        assert (report.parent / figure).is_file() and f"]({figure})" in text
    assert "verdict:" in printed and f"fingerprint {profile.short}" in printed


def test_command_with_a_labels_csv_and_unlabelled_films(tmp_path: Path, ckpt: Path) -> None:
    folder = films(tmp_path / "site", 10, 10, flat=True)
    extra = films(tmp_path / "site" / "more", 3, 3, seed=1, flat=True)
    rows = ["path,label"] + [
        f"{p.name},{'PNEUMONIA' if 'pneu' in p.name else '0'}" for p in sorted(folder.glob("*.png"))
    ]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    assert run_site(site_config(tmp_path, ckpt, folder, f"labels={folder / 'labels.csv'}")) == 0
    data = json.loads((tmp_path / "site.json").read_text())
    assert data["films"]["labels_from"] == "csv"
    assert (data["films"]["n_normal"], data["films"]["n_pneumonia"], data["films"]["n_unlabelled"]) == (
        10,
        10,
        6,
    )
    assert sorted(f["path"] for f in data["films"]["list"] if f["label"] is None) == sorted(
        f"more/{p.name}" for p in extra.glob("*.png")
    )


def test_unlabelled_flat_folder_gives_prevalence_only(tmp_path: Path, ckpt: Path) -> None:
    folder = films(tmp_path / "site", 15, 15, flat=True)
    assert run_site(site_config(tmp_path, ckpt, folder)) == 0
    profile = load_site_profile(tmp_path / "site.json")
    assert profile.data["films"]["n_unlabelled"] == 30 and profile.data["films"]["labels_from"] == "none"
    assert profile.temperature == pytest.approx(1.3)  # the model's: no labels, no calibration change
    assert profile.data["verdict"]["kind"] in ("prevalence_only", "unchanged")
    assert any("no labelled films" in w for w in profile.data["warnings"])
    assert not (tmp_path / "site_report" / "site_roc.png").exists()
    # one checkpoint carries no reference score distribution: the unlabelled films move nothing, and say why
    prevalence = profile.data["fitted"]["prevalence"]
    assert prevalence["unlabelled"] == "no_reference" and not prevalence["changed"]
    assert profile.offset == pytest.approx(0.0) and profile.data["verdict"]["kind"] == "unchanged"
    assert any("carries no reference score distribution" in w for w in profile.data["warnings"])
    assert "no reference score distribution" in (tmp_path / "site_report" / "site_report.md").read_text()


# ----------------------------------------------------------------------------------------- bad input
def test_unreadable_film_stops_or_is_skipped(tmp_path: Path, ckpt: Path) -> None:
    folder = films(tmp_path / "site", 6, 6)
    (folder / "NORMAL" / "broken.png").write_bytes(b"")
    (folder / "PNEUMONIA" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(SiteInputError) as err:
        run_site(site_config(tmp_path, ckpt, folder))
    message = str(err.value)
    assert "2 unreadable film(s)" in message and "broken.png" in message and "cut.png" in message
    assert "skip_bad_images=true" in message and not (tmp_path / "site.json").exists()
    assert run_site(site_config(tmp_path, ckpt, folder, "skip_bad_images=true")) == 0
    data = json.loads((tmp_path / "site.json").read_text())
    assert sorted(Path(s["path"]).name for s in data["films"]["skipped"]) == ["broken.png", "cut.png"]
    assert data["films"]["n"] == 12


def test_a_class_with_no_films_is_an_error(tmp_path: Path, ckpt: Path) -> None:
    folder = films(tmp_path / "site", 8, 0)
    (folder / "PNEUMONIA").mkdir(exist_ok=True)
    with pytest.raises(SiteInputError, match=r"PNEUMONIA is missing or holds no films"):
        run_site(site_config(tmp_path, ckpt, folder))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            ["path,label", "normal_000.png,NORMAL", "gone.png,PNEUMONIA"],
            r"labels.csv:3: gone.png: no such file",
        ),
        (["path,label", "normal_000.png,NORMAL", "pneumonia_000.png,maybe"], r"labels.csv:3: label 'maybe'"),
        (["file,class", "normal_000.png,NORMAL"], r"needs a header with columns path,label"),
        (["path,label", "normal_000.png,NORMAL", "normal_001.png,0"], r"no PNEUMONIA films among its 2"),
        (
            ["path,label", "normal_000.png,NORMAL", "normal_000.png,1"],
            r"labels.csv:3: normal_000.png is listed twice",
        ),
    ],
)
def test_bad_labels_csv_names_the_row(tmp_path: Path, ckpt: Path, rows: list[str], message: str) -> None:
    folder = films(tmp_path / "site", 3, 3, flat=True)
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SiteInputError, match=message):
        run_site(site_config(tmp_path, ckpt, folder, f"labels={folder / 'labels.csv'}"))


def test_user_errors_exit_2_with_one_line(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = site_config(tmp_path, ckpt, tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exited, fail_cleanly(logging.getLogger("xray")):
        run_site(cfg)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: input={tmp_path / 'nowhere'}: no such folder"]
    for override, message in (("alpha=0.7", "alpha must be"), ("prevalence=often", "prevalence must be")):
        with pytest.raises(Exception, match=message):
            run_site(site_config(tmp_path, ckpt, tmp_path, override))


# ----------------------------------------------------------------------------------- predict and export
def _profile(tmp_path: Path, ckpt: Path, name: str = "site.json") -> Path:
    """A profile with known numbers, for the model at ``ckpt``."""
    fit = SiteFit(2.0, -0.3, 0.4, 0.1, 0.35, -0.7, 0.743, True, True, 20.0, 8.0)
    write_site_profile(tmp_path / name, profile_data(fit, model_record(load_predictor(str(ckpt)))))
    return tmp_path / name


def test_predict_applies_the_profile_exactly_and_names_it(tmp_path: Path, ckpt: Path) -> None:
    folder = films(tmp_path / "site", 4, 4)
    site = _profile(tmp_path, ckpt)
    out = tmp_path / "preds.csv"
    cfg = compose_hydra(
        "predict",
        tmp_path / "p",
        [f"ckpt={ckpt}", f"input={folder}", f"output={out}", "num_workers=0", f"site={site}"],
    )
    assert run_predict(cfg) == 0
    columns, rows = read_csv(out)
    assert tuple(columns) == (*CSV_COLUMNS, SITE_COLUMN)
    paths = [Path(r["path"]) for r in rows]
    z = raw_logits(make_net(SIZE, 0), paths)
    expected = torch.sigmoid(z / 2.0 - 0.7)
    got = torch.tensor([float(r["prob_pneumonia"]) for r in rows], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-6)
    assert [r["label"] for r in rows] == ["PNEUMONIA" if p >= 0.35 else "NORMAL" for p in expected.tolist()]
    short = load_site_profile(site).short
    assert {r["site"] for r in rows} == {f"site.json (model {short})"} and {r["threshold"] for r in rows} == {
        "0.35"
    }
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["site"]["label"] == f"site.json (model {short})"
    # without site= the CSV keeps its columns
    plain = tmp_path / "plain.csv"
    cfg = compose_hydra(
        "predict", tmp_path / "q", [f"ckpt={ckpt}", f"input={folder}", f"output={plain}", "num_workers=0"]
    )
    assert run_predict(cfg) == 0 and tuple(read_csv(plain)[0]) == CSV_COLUMNS


def test_predict_refuses_another_models_profile(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = save_ckpt(tmp_path / "other.ckpt", make_net(SIZE, 5))
    site = _profile(tmp_path, other)
    folder = films(tmp_path / "site", 2, 2)
    cfg = compose_hydra(
        "predict",
        tmp_path / "p",
        [f"ckpt={ckpt}", f"input={folder}", f"output={tmp_path / 'x.csv'}", f"site={site}"],
    )
    with pytest.raises(SystemExit) as exited, fail_cleanly(logging.getLogger("xray")):
        run_predict(cfg)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"{site} was fitted for model {load_site_profile(site).short}" in err
    assert f"this is model {model_fingerprint(load_predictor(str(ckpt)))[:12]}" in err
    assert not (tmp_path / "x.csv").exists()


def test_export_carries_the_profile(tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = load_site_profile(_profile(tmp_path, ckpt))
    predictor = load_predictor(str(ckpt))
    path, meta_path = export_model(predictor, tmp_path / "m.pt", "torchscript", site=site)
    meta = json.loads(meta_path.read_text())
    assert meta["threshold"] == 0.35 and meta["temperature"] == 2.0
    assert meta["site"]["fingerprint"] == site.fingerprint and meta["site"]["offset"] == -0.7
    assert meta["site"]["model_threshold"] == pytest.approx(0.6)
    images = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    out = run_exported(path, images, "torchscript")
    assert torch.allclose(
        out["prob_pneumonia"].double(), torch.sigmoid(out["logit"].double() / 2.0 - 0.7), atol=1e-6
    )
    # the command: prints the profile, and a profile of another model is refused
    cfg = compose_hydra(
        "export",
        tmp_path / "e",
        [f"ckpt={ckpt}", "format=torchscript", f"output={tmp_path / 'c.pt'}", f"site={site.path}"],
    )
    assert run_export(cfg) == 0 and "site profile: site.json" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.pt.json").read_text())["site"]["label"] == site.label
    other = _profile(tmp_path, save_ckpt(tmp_path / "o.ckpt", make_net(SIZE, 7)), "other.json")
    cfg = compose_hydra(
        "export",
        tmp_path / "f",
        [f"ckpt={ckpt}", "format=torchscript", f"output={tmp_path / 'd.pt'}", f"site={other}"],
    )
    with pytest.raises(SiteProfileError, match="was fitted for model"):
        run_export(cfg)
