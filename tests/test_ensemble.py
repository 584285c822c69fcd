"""Calibrated probabilities (stored temperature) and ensembles in prediction: the ensemble probability is
sigmoid(mean of the members' raw logits / T), the manifest, the no-manifest rules, ckpt= resolution,
and predict.py end to end with ``ckpt=[a,b]`` and ``ckpt=DIR``.

The checkpoints here are tiny SeedCNNs saved by hand (no training), with the output layer scaled so
that the logits spread: mean-of-logits and mean-of-probabilities then differ measurably.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from tests.conftest import synthetic_xray
from tests.helpers import compose_hydra, run_script
from xray.core.checkpoint_io import CheckpointError
from xray.core.constants import CLASSES
from xray.data.transforms import load_resized, rescale
from xray.inference.checkpoints import LoadedModel, load_model
from xray.inference.predict import EXIT_OK, predict_files, run_predict
from xray.inference.predictor import (
    MANIFEST_NAME,
    Predictor,
    load_predictor,
    resolve_checkpoint,
    write_ensemble_manifest,
)
from xray.models import SeedCNN, flip_tta_logits

N_IMAGES = 6


# ---------------------------------------------------------------------------------------------- helpers
def make_net(image_size: int, seed: int, spread: float = 40.0) -> SeedCNN:
    """A tiny SeedCNN with its own weights; the output layer scaled so the logits spread over a few units."""
    torch.manual_seed(seed)
    net = SeedCNN(image_size=image_size, channels=[4], dense_units=4, dropout=0.0).eval()
    with torch.no_grad():
        net.classifier[-1].weight.mul_(spread)
        net.classifier[-1].bias.fill_(0.3 * (seed - 1))
    return net


def save_ckpt(path: Path, net: SeedCNN, interpolation: str = "bilinear", **meta: Any) -> Path:
    """An xray checkpoint as the training code writes it (the parts prediction reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    xray = {
        "format": 1,
        "net": dict(net.config),
        "preprocessing": {"image_size": net.config["image_size"], "interpolation": interpolation},
        "classes": list(CLASSES),
        "threshold": 0.5,
        "tta": False,
        **meta,
    }
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "xray": xray}, path)
    return path


def raw_logits(net: SeedCNN, paths: list[Path], interpolation: str = "bilinear", tta: bool = False) -> Tensor:
    """The network's raw logits on ``paths``, computed here from the training preprocessing."""
    size = net.config["image_size"]
    images = torch.stack([torch.from_numpy(load_resized(p, size, interpolation)).unsqueeze(0) for p in paths])
    with torch.no_grad():
        x = rescale(images)
        return (flip_tta_logits(net, x) if tta else net(x)).double().reshape(-1)


def rows_probs(rows: list[Any]) -> Tensor:
    assert all(r.error is None for r in rows), [r.error for r in rows]
    return torch.tensor([r.prob_pneumonia for r in rows], dtype=torch.float64)


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def predict_config(out_dir: Path, overrides: list[str]) -> Any:
    return compose_hydra("predict", out_dir, ["num_workers=0", "device=cpu", *overrides])


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Synthetic films of different sizes (PNG), half with the 'pneumonia' blob."""
    folder = tmp_path_factory.mktemp("films")
    rng = np.random.default_rng(7)
    paths = []
    for i in range(N_IMAGES):
        path = folder / f"film{i}.png"
        Image.fromarray(synthetic_xray(i % 2, 50 + 9 * i, rng)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def nets() -> dict[str, SeedCNN]:
    return {"a": make_net(32, 0), "b": make_net(32, 1), "c": make_net(40, 2), "d": make_net(24, 3)}


# ----------------------------------------------------------------------------------- ensemble probability
@pytest.mark.parametrize(
    "members",
    [
        [("a", "bilinear", False), ("b", "bilinear", False)],
        [("a", "bilinear", False), ("c", "nearest", True), ("d", "bilinear", False)],  # 3 preprocessings
        [("c", "bilinear", False), ("a", "bilinear", True), ("b", "bilinear", False)],  # grouped 2 + 1
    ],
)
def test_ensemble_probability_is_sigmoid_of_mean_logit(
    members: list[tuple[str, str, bool]], nets: dict[str, SeedCNN], images: list[Path], tmp_path: Path
) -> None:
    ckpts = [
        save_ckpt(tmp_path / f"{k}_{name}.ckpt", nets[name], interp, tta=tta)
        for k, (name, interp, tta) in enumerate(members)
    ]
    predictor = load_predictor([str(c) for c in ckpts])
    assert predictor.is_ensemble and len(predictor.members) == len(members)
    assert predictor.temperature == 1.0
    rows = predict_files(predictor, images, batch_size=4, device="cpu")
    assert [r.path for r in rows] == [str(p) for p in images]
    logits = torch.stack([raw_logits(nets[n], images, i, t) for n, i, t in members], dim=1)
    expected = torch.sigmoid(logits.mean(dim=1))
    assert max_diff(rows_probs(rows), expected) < 1e-6
    # the check is sensitive: averaging probabilities instead of logits would fail it
    assert max_diff(torch.sigmoid(logits).mean(dim=1), expected) > 1e-3


def test_ensemble_with_temperature_and_tta_override(
    nets: dict[str, SeedCNN], images: list[Path], tmp_path: Path
) -> None:
    """tta=True applies to every member; the manifest's T divides the mean logit."""
    folder = tmp_path / "ens"
    save_ckpt(folder / "m0.ckpt", nets["a"], tta=False)
    save_ckpt(folder / "m1.ckpt", nets["c"], "nearest", tta=False)
    write_ensemble_manifest(folder, ["m0.ckpt", "m1.ckpt"], 0.4, 2.5, "youden")
    rows = predict_files(load_predictor(str(folder)), images, device="cpu", tta=True)
    logits = torch.stack(
        [raw_logits(nets["a"], images, tta=True), raw_logits(nets["c"], images, "nearest", tta=True)], dim=1
    )
    assert max_diff(rows_probs(rows), torch.sigmoid(logits.mean(dim=1) / 2.5)) < 1e-6
    plain = torch.stack([raw_logits(nets["a"], images), raw_logits(nets["c"], images, "nearest")], dim=1)
    assert max_diff(torch.sigmoid(plain.mean(dim=1) / 2.5), torch.sigmoid(logits.mean(dim=1) / 2.5)) > 1e-4


def test_unreadable_file_fails_once_and_the_rest_is_predicted(
    nets: dict[str, SeedCNN], images: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    ckpts = [save_ckpt(tmp_path / "a.ckpt", nets["a"]), save_ckpt(tmp_path / "c.ckpt", nets["c"])]
    rows = predict_files(
        load_predictor([str(c) for c in ckpts]), [images[0], broken, images[1]], device="cpu"
    )
    assert [r.ok for r in rows] == [True, False, True]
    assert rows[1].prob_pneumonia is None and rows[1].label is None and rows[1].error
    logits = torch.stack([raw_logits(nets["a"], images[:2]), raw_logits(nets["c"], images[:2])], dim=1)
    got = torch.tensor([rows[0].prob_pneumonia, rows[2].prob_pneumonia], dtype=torch.float64)
    assert max_diff(got, torch.sigmoid(logits.mean(dim=1))) < 1e-6


# ------------------------------------------------------------------------------------------- temperature
def test_checkpoint_temperature_calibrates_probability_and_label(
    nets: dict[str, SeedCNN], images: list[Path], tmp_path: Path
) -> None:
    logits = raw_logits(nets["a"], images)
    threshold = float(torch.sigmoid(logits / 2.0).median())
    path = save_ckpt(tmp_path / "t2.ckpt", nets["a"], temperature=2.0, threshold=threshold)
    model = load_model(path)
    assert model.temperature == 2.0
    rows = predict_files(model, images, device="cpu")
    probs = rows_probs(rows)
    assert max_diff(probs, torch.sigmoid(logits / 2.0)) < 1e-6
    assert max_diff(probs, torch.sigmoid(logits)) > 1e-2
    assert [r.label for r in rows] == [CLASSES[int(p >= threshold)] for p in probs.tolist()]
    assert {r.label for r in rows} == set(CLASSES)


def test_old_checkpoint_without_temperature_is_unchanged(
    nets: dict[str, SeedCNN], images: list[Path], tmp_path: Path
) -> None:
    model = load_model(save_ckpt(tmp_path / "old.ckpt", nets["b"]))
    assert "temperature" not in model.meta and model.temperature == 1.0
    probs = rows_probs(predict_files(model, images, device="cpu"))
    # what predict computed before temperatures existed: sigmoid of the float32 logits
    before = torch.sigmoid(raw_logits(nets["b"], images).float()).double()
    assert max_diff(probs, before) < 1e-6


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "2.0", True])
def test_bad_temperature_is_a_clean_error_naming_the_file(
    bad: Any, nets: dict[str, SeedCNN], tmp_path: Path
) -> None:
    path = save_ckpt(tmp_path / "bad_t.ckpt", nets["a"], temperature=bad)
    with pytest.raises(CheckpointError, match="temperature must be a finite number > 0") as err:
        load_model(path)
    assert str(err.value).startswith(f"{path}: ")
    model = LoadedModel(net=nets["a"], meta={"temperature": bad}, path=path)  # built without load_model
    with pytest.raises(CheckpointError, match=str(path).replace("\\", "\\\\")):
        _ = model.temperature


def test_bad_temperature_exits_2_through_predict(
    nets: dict[str, SeedCNN], images: list[Path], tmp_path: Path, capsys
) -> None:
    import predict

    path = save_ckpt(tmp_path / "nan.ckpt", nets["a"], temperature=float("nan"))
    cfg = predict_config(tmp_path / "out", [f"ckpt={path}", f"input={images[0]}"])
    with pytest.raises(SystemExit) as exited:
        predict.main.__wrapped__(cfg)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and "temperature" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_threshold_and_temperature_are_used(
    nets: dict[str, SeedCNN], images: list[Path], tmp_path: Path, caplog
) -> None:
    folder = tmp_path / "ensemble"
    a = save_ckpt(folder / "fold0.ckpt", nets["a"], threshold=0.9, temperature=3.0)
    save_ckpt(folder / "sub" / "fold1.ckpt", nets["d"], threshold=0.9)
    manifest = write_ensemble_manifest(
        folder, [a, "sub/fold1.ckpt"], 0.35, 1.7, "youden on out-of-fold", description="2 folds", auroc=0.9
    )
    stored = json.loads(manifest.read_text())
    assert manifest == folder / MANIFEST_NAME
    assert stored["format"] == 1 and stored["members"] == ["fold0.ckpt", "sub/fold1.ckpt"]
    assert (stored["threshold"], stored["temperature"], stored["threshold_rule"]) == (
        0.35,
        1.7,
        "youden on out-of-fold",
    )
    assert stored["description"] == "2 folds" and stored["auroc"] == 0.9
    assert not list(folder.glob(".*.tmp"))

    predictor = load_predictor(str(folder))
    assert (predictor.threshold, predictor.temperature) == (0.35, 1.7)
    out = tmp_path / "out"
    assert run_predict(predict_config(out, [f"ckpt={folder}", f"input={images[0].parent}"])) == EXIT_OK
    csv_rows = read_csv(out / "preds.csv")
    probs = torch.tensor([float(r["prob_pneumonia"]) for r in csv_rows], dtype=torch.float64)
    logits = torch.stack([raw_logits(nets["a"], images), raw_logits(nets["d"], images)], dim=1)
    assert max_diff(probs, torch.sigmoid(logits.mean(dim=1) / 1.7)) < 1e-6  # CSV has 8 decimals
    assert {float(r["threshold"]) for r in csv_rows} == {0.35}
    assert [r["label"] for r in csv_rows] == [CLASSES[int(p >= 0.35)] for p in probs.tolist()]
    stdout = caplog.text
    assert f"checkpoint: {folder} (ensemble of 2 from {MANIFEST_NAME})" in stdout
    assert "threshold 0.3500 (from ensemble.json); temperature 1.7000" in stdout
    assert "image size 32px (bilinear) + 24px (bilinear)" in stdout


def test_manifest_missing_member_names_the_file(nets: dict[str, SeedCNN], tmp_path: Path) -> None:
    folder = tmp_path / "ensemble"
    save_ckpt(folder / "fold0.ckpt", nets["a"])
    gone = save_ckpt(folder / "fold1.ckpt", nets["b"])
    write_ensemble_manifest(folder, ["fold0.ckpt", "fold1.ckpt"], 0.5, 1.0, "fixed")
    gone.unlink()
    with pytest.raises(CheckpointError, match="member checkpoint .*fold1.ckpt not found") as err:
        load_predictor(str(folder))
    assert str(folder / "fold1.ckpt") in str(err.value)
    with pytest.raises(CheckpointError, match="fold1.ckpt not found"):  # and when writing one
        write_ensemble_manifest(folder, ["fold0.ckpt", "fold1.ckpt"], 0.5, 1.0, "fixed")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "cannot read the ensemble manifest"),
        ('{"format": 2, "members": ["a.ckpt"], "threshold": 0.5, "temperature": 1}', "format 1"),
        ('{"format": 1, "members": [], "threshold": 0.5, "temperature": 1}', "non-empty list"),
        ('{"format": 1, "members": ["a.ckpt"], "threshold": 1.5, "temperature": 1}', "threshold must be"),
        ('{"format": 1, "members": ["a.ckpt"], "threshold": 0.5, "temperature": 0}', "temperature must be"),
    ],
)
def test_bad_manifest_is_a_clean_error(content: str, match: str, tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(CheckpointError, match=match) as err:
        load_predictor(str(tmp_path))
    assert str(err.value).startswith(str(tmp_path / MANIFEST_NAME))


def test_write_manifest_rejects_bad_values(nets: dict[str, SeedCNN], tmp_path: Path) -> None:
    save_ckpt(tmp_path / "a.ckpt", nets["a"])
    with pytest.raises(CheckpointError, match="temperature must be"):
        write_ensemble_manifest(tmp_path, ["a.ckpt"], 0.5, float("nan"), "fixed")
    with pytest.raises(ValueError, match="format"):
        write_ensemble_manifest(tmp_path, ["a.ckpt"], 0.5, 1.0, "fixed", format=2)
    assert not (tmp_path / MANIFEST_NAME).exists()


# ------------------------------------------------------------------------------------ without a manifest
def test_list_without_manifest_uses_mean_threshold_and_temperature(
    nets: dict[str, SeedCNN], images: list[Path], tmp_path: Path
) -> None:
    a = save_ckpt(tmp_path / "a.ckpt", nets["a"], threshold=0.2)
    b = save_ckpt(tmp_path / "b.ckpt", nets["b"], threshold=0.6)
    plain = load_predictor([str(a), str(b)])
    assert plain.threshold == pytest.approx(0.4) and plain.temperature == 1.0
    rows = predict_files(plain, images, device="cpu")
    assert all(r.threshold == pytest.approx(0.4) for r in rows)
    c = save_ckpt(tmp_path / "c.ckpt", nets["a"], threshold=0.2, temperature=2.0)
    calibrated = load_predictor([str(c), str(b)])
    assert calibrated.temperature == pytest.approx(1.5)
    logits = torch.stack([raw_logits(nets["a"], images), raw_logits(nets["b"], images)], dim=1)
    probs = rows_probs(predict_files(calibrated, images, device="cpu"))
    assert max_diff(probs, torch.sigmoid(logits.mean(dim=1) / 1.5)) < 1e-6


def test_bare_folder_of_checkpoints_is_an_ensemble(nets: dict[str, SeedCNN], tmp_path: Path) -> None:
    folder = tmp_path / "folds"
    save_ckpt(folder / "f0.ckpt", nets["a"], threshold=0.3)
    save_ckpt(folder / "f1.ckpt", nets["b"], threshold=0.5)
    save_ckpt(folder / "f2.ckpt", nets["c"], threshold=0.7)
    (folder / "notes.txt").write_text("not a checkpoint")
    assert resolve_checkpoint(str(folder)) == folder
    predictor = load_predictor(str(folder))
    assert [m.path.name for m in predictor.members] == ["f0.ckpt", "f1.ckpt", "f2.ckpt"]
    assert predictor.threshold == pytest.approx(0.5)
    one = tmp_path / "one"
    save_ckpt(one / "only.ckpt", nets["a"])
    with pytest.raises(CheckpointError, match="run directory holds no"):
        load_predictor(str(one))


def test_run_directory_stays_a_single_model(nets: dict[str, SeedCNN], tmp_path: Path) -> None:
    """A training run dir (and its checkpoints/ folder) is one model, however many .ckpt it holds."""
    run = tmp_path / "run"
    best = save_ckpt(run / "checkpoints" / "best_xray_model.ckpt", nets["a"])
    save_ckpt(run / "checkpoints" / "last.ckpt", nets["b"])
    save_ckpt(run / "checkpoints" / "epoch=1.ckpt", nets["b"])
    save_ckpt(run / "x.ckpt", nets["a"])
    save_ckpt(run / "y.ckpt", nets["b"])
    for spec, expected in ((run, best), (run / "checkpoints", best)):
        predictor = load_predictor(str(spec))
        assert not predictor.is_ensemble and predictor.members[0].path == expected
        assert predictor.source == str(expected)


def test_list_member_may_not_be_an_ensemble_folder(nets: dict[str, SeedCNN], tmp_path: Path) -> None:
    folder = tmp_path / "folds"
    save_ckpt(folder / "f0.ckpt", nets["a"])
    save_ckpt(folder / "f1.ckpt", nets["b"])
    with pytest.raises(CheckpointError, match="cannot be a member"):
        load_predictor([str(folder / "f0.ckpt"), str(folder)])
    with pytest.raises(CheckpointError, match="names no checkpoints"):
        load_predictor([])


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_pretrained_may_be_a_file_or_an_ensemble_folder(
    kind: str, nets: dict[str, SeedCNN], tmp_path: Path, monkeypatch
) -> None:
    if kind == "file":
        target = save_ckpt(tmp_path / "shipped.ckpt", nets["a"], threshold=0.42)
    else:
        target = tmp_path / "shipped"
        save_ckpt(target / "m0.ckpt", nets["a"])
        save_ckpt(target / "m1.ckpt", nets["c"])
        write_ensemble_manifest(target, ["m0.ckpt", "m1.ckpt"], 0.42, 1.3, "fixed")
    monkeypatch.setattr("xray.inference.predictor.PRETRAINED_PATH", target)
    predictor = load_predictor("pretrained")
    assert predictor.is_ensemble == (kind == "folder")
    assert predictor.threshold == 0.42
    assert predictor.temperature == (1.0 if kind == "file" else 1.3)


def test_single_checkpoint_predictor_reads_its_meta(nets: dict[str, SeedCNN], tmp_path: Path) -> None:
    model = load_model(save_ckpt(tmp_path / "a.ckpt", nets["a"], threshold=0.3, temperature=1.25, tta=True))
    predictor = Predictor.from_model(model)
    assert (predictor.threshold, predictor.temperature, predictor.source) == (0.3, 1.25, str(model.path))
    assert model.tta and not predictor.is_ensemble


# ---------------------------------------------------------------------------------------------- grad-cam
def test_gradcam_of_an_ensemble_uses_the_first_member(
    nets: dict[str, SeedCNN], images: list[Path], tmp_path: Path, monkeypatch
) -> None:
    import xray.inference.predict

    used: list[Any] = []

    class Recording(xray.inference.predict.GradCam):
        def __init__(self, net: Any, out_dir: Any = None) -> None:
            used.append(net)
            super().__init__(net, out_dir)

    monkeypatch.setattr(xray.inference.predict, "GradCam", Recording)
    ckpts = [save_ckpt(tmp_path / "c.ckpt", nets["c"]), save_ckpt(tmp_path / "a.ckpt", nets["a"])]
    predictor = load_predictor([str(c) for c in ckpts])
    rows = predict_files(predictor, images[:3], device="cpu", gradcam_dir=tmp_path / "cam")
    assert used == [predictor.members[0].net]
    assert len(list((tmp_path / "cam").glob("*.png"))) == 3
    assert all(r.gradcam and Path(r.gradcam).is_file() for r in rows)


# -------------------------------------------------------------------------------------------------- CLI
def test_ckpt_default_is_a_string() -> None:
    from omegaconf import OmegaConf

    from tests.conftest import PROJECT_ROOT

    assert OmegaConf.load(PROJECT_ROOT / "conf" / "predict.yaml").ckpt == "best"


@pytest.mark.parametrize("form", ["list", "folder"])
def test_predict_py_with_an_ensemble(
    form: str, nets: dict[str, SeedCNN], images: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "ens"
    a = save_ckpt(folder / "a.ckpt", nets["a"], threshold=0.3)
    b = save_ckpt(folder / "b.ckpt", nets["c"], threshold=0.5)
    spec = f"ckpt=[{a},{b}]" if form == "list" else f"ckpt={folder}"
    out = tmp_path / "out" / "preds.csv"
    proc = run_script(
        "predict.py", [spec, f"input={images[0].parent}", f"output={out}", "num_workers=0"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    expected_source = f"ensemble of 2: {a}, {b}" if form == "list" else f"{folder} (ensemble of 2 *.ckpt)"
    assert f"checkpoint: {expected_source}" in proc.stdout
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [str(p) for p in images]
    assert all(r["error"] == "" for r in rows)
    assert {float(r["threshold"]) for r in rows} == {0.4}
    probs = torch.tensor([float(r["prob_pneumonia"]) for r in rows], dtype=torch.float64)
    logits = torch.stack([raw_logits(nets["a"], images), raw_logits(nets["c"], images)], dim=1)
    assert max_diff(probs, torch.sigmoid(logits.mean(dim=1))) < 1e-6
