"""predict.py / xray.inference.predict: checkpoint resolution, input forms, CSV, exit codes, consistency with
training, untrusted checkpoints, class-folder metrics, Grad-CAM, and predict.py end to end."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import compose_hydra, run_script
from tests.odd_files import (
    ODD_REASONS,
    gradient_image,
    make_odd_files,
    make_valid_files,
    noise_image,
    write_dicom,
    write_png,
)
from xray.core.checkpoint_io import CheckpointError, load_checkpoint_file
from xray.core.config_checks import ConfigError
from xray.data.io import ImageInfo
from xray.evaluation.metrics import classification_metrics
from xray.inference.checkpoints import load_model
from xray.inference.gradcam import GradCam, last_conv2d
from xray.inference.predict import (
    CSV_COLUMNS,
    EXIT_OK,
    EXIT_SOME_FAILED,
    InputError,
    WarningLimits,
    class_from_path,
    collate_separating_failures,
    collect_inputs,
    predict_files,
    resolve_device,
    run_predict,
)

# the files of make_odd_files that a folder scan picks up (the directory is skipped, the .xyz ignored)
ODD_IN_FOLDER = {"zero_byte", "truncated_jpeg", "text_as_png", "bomb_png", "dicom_no_pixels"}


# ---------------------------------------------------------------------------------------------- helpers
def predict_config(out_dir: Path, overrides: list[str]) -> Any:
    """conf/predict.yaml composed as predict.py would see it, writing into ``out_dir``."""
    return compose_hydra("predict", out_dir, ["num_workers=0", *overrides])


def run_cli(out_dir: Path, overrides: list[str]) -> int:
    """The body of predict.py's Hydra main (fail_cleanly included) in-process; returns the exit code."""
    import predict

    with pytest.raises(SystemExit) as exited:
        predict.main.__wrapped__(predict_config(out_dir, overrides))
    return int(exited.value.code)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def png(path: Path) -> Path:
    """A small readable PNG at ``path`` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png(path, gradient_image())


def dcm(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_dicom(path, gradient_image().astype(np.uint16))


def copy_images(src: Path, dst: Path, n: int) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.jpeg"))[:n]
    return [Path(shutil.copy2(f, dst / f.name)) for f in files]


def save_malicious_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint that looks like ours but whose unpickling would run a shell command."""

    class Payload:
        def __reduce__(self):  # unpickling this object calls os.system("touch MARKER")
            return (os.system, (f"touch '{marker}'",))

    torch.save({"state_dict": {}, "xray": {"net": {"name": "SeedCNN"}, "payload": Payload()}}, path)


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def log_dir(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """logs/ with an older and a newer training run (same weights, distinct paths)."""
    root = tmp_path_factory.mktemp("logs")
    now = time.time()
    for name, age in (("2024-01-01_00-00-00", 3600), ("2024-01-02_00-00-00", 0)):
        ckpts = root / "train" / "runs" / name / "checkpoints"
        shutil.copytree(trained_run / "checkpoints", ckpts)
        for f in ckpts.iterdir():
            os.utime(f, (now - age, now - age))
    return root


@pytest.fixture
def few_images(session_dataset: Path, tmp_path: Path) -> Path:
    """Three readable JPEGs in a folder not named by class."""
    folder = tmp_path / "few"
    copy_images(session_dataset / "test" / "NORMAL", folder, 2)
    copy_images(session_dataset / "test" / "PNEUMONIA", folder, 1)
    return folder


@pytest.fixture
def mixed_folder(session_dataset: Path, tmp_path: Path) -> Path:
    """Three good images plus every odd file of tests/odd_files.py."""
    folder = tmp_path / "mixed"
    copy_images(session_dataset / "test" / "PNEUMONIA", folder, 3)
    make_odd_files(folder)
    return folder


# ---------------------------------------------------------------------------------------- ckpt resolution
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("best", "train/runs/2024-01-02_00-00-00/checkpoints/best_xray_model.ckpt"),
        ("last", "train/runs/2024-01-02_00-00-00/checkpoints/last.ckpt"),
        ("RUN_DIR", "train/runs/2024-01-01_00-00-00/checkpoints/best_xray_model.ckpt"),
        ("FILE", "train/runs/2024-01-01_00-00-00/checkpoints/last.ckpt"),
    ],
)
def test_ckpt_resolution(
    spec: str, expected: str, log_dir: Path, few_images: Path, tmp_path: Path, caplog
) -> None:
    spec = {
        "RUN_DIR": str(log_dir / "train/runs/2024-01-01_00-00-00"),
        "FILE": str(log_dir / "train/runs/2024-01-01_00-00-00/checkpoints/last.ckpt"),
    }.get(spec, spec)
    cfg = predict_config(
        tmp_path / "out", [f"ckpt={spec}", f"input={few_images}", f"paths.log_dir={log_dir}"]
    )
    assert run_predict(cfg) == EXIT_OK
    assert f"checkpoint: {log_dir / expected}\n" in caplog.text


def test_ckpt_pretrained_missing_is_a_clear_error(
    monkeypatch, few_images: Path, tmp_path: Path, capsys
) -> None:
    missing = tmp_path / "models" / "xray_cpu_fast.ckpt"
    monkeypatch.setattr("xray.inference.predictor.PRETRAINED_PATH", missing)
    assert run_cli(tmp_path / "out", ["ckpt=pretrained", f"input={few_images}"]) == 2
    err = capsys.readouterr().err
    assert f"error: ckpt=pretrained: shipped model {missing} is missing" in err
    assert "Traceback" not in err


def test_ckpt_best_without_training_runs(few_images: Path, tmp_path: Path, capsys) -> None:
    assert (
        run_cli(tmp_path / "out", ["ckpt=best", f"input={few_images}", f"paths.log_dir={tmp_path / 'none'}"])
        == 2
    )
    assert "error: ckpt=best: no best_xray_model.ckpt found under" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- input forms
def test_input_folder_is_recursive_and_ignores_other_extensions(tmp_path: Path) -> None:
    root = tmp_path / "in"
    a = png(root / "a.png")
    b = dcm(root / "sub" / "deeper" / "b.DCM")
    (root / "notes.txt").write_text("not an image")
    png(root / "sub" / "image.xyz")
    png(root / ".hidden.png")
    assert collect_inputs(root) == [a, b]


def test_input_single_file_of_any_extension_is_attempted(tmp_path: Path) -> None:
    odd = png(tmp_path / "scan.xyz")
    assert collect_inputs(odd) == [odd]


def test_input_glob(tmp_path: Path) -> None:
    pngs = [png(tmp_path / f"{i}.png") for i in range(3)]
    dcm(tmp_path / "x.dcm")
    assert collect_inputs(f"{tmp_path}/*.png") == pngs
    assert len(collect_inputs(f"{tmp_path}/**/*")) == 4
    with pytest.raises(InputError, match=r"the pattern matches no files"):
        collect_inputs(f"{tmp_path}/*.jpeg")


def test_input_list_file(tmp_path: Path) -> None:
    rel = png(tmp_path / "lists" / "imgs" / "rel.png")
    absolute = png(tmp_path / "abs.png")
    odd = png(tmp_path / "lists" / "odd.xyz")
    folder = tmp_path / "lists" / "folder"
    inside = png(folder / "in.png")
    listing = tmp_path / "lists" / "files.txt"
    listing.write_text(
        f"# a comment\n\nimgs/rel.png\n   {absolute}   \nodd.xyz\nmissing.png\nfolder\n\r\n# end\n"
    )
    assert collect_inputs(listing) == [rel, absolute, odd, tmp_path / "lists" / "missing.png", inside]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="names no files"):
        collect_inputs(empty)


def test_list_file_rows_predicted_or_failed_in_order(best_ckpt: Path, tmp_path: Path, caplog) -> None:
    good = png(tmp_path / "good.png")
    listing = tmp_path / "list.txt"
    listing.write_text("good.png\nmissing.png\nodd.xyz\n")
    png(tmp_path / "odd.xyz")
    cfg = predict_config(tmp_path / "out", [f"ckpt={best_ckpt}", f"input={listing}"])
    assert run_predict(cfg) == EXIT_SOME_FAILED
    _, rows = read_csv(tmp_path / "out" / "preds.csv")
    assert [r["path"] for r in rows] == [str(good), str(tmp_path / "missing.png"), str(tmp_path / "odd.xyz")]
    assert rows[0]["error"] == "" and rows[0]["prob_pneumonia"]
    assert rows[1]["error"] == "file not found"
    assert "unsupported file type '.xyz'" in rows[2]["error"]
    assert "predicted 1, failed 2 (of 3 files)" in caplog.text


@pytest.mark.parametrize("what", ["missing", "empty_folder", "empty_glob"])
def test_input_errors_exit_2_with_message(what: str, best_ckpt: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.md").write_text("no images here")
    spec = {"missing": tmp_path / "nope", "empty_folder": empty, "empty_glob": f"{empty}/*.png"}[what]
    assert run_cli(tmp_path / "out", [f"ckpt={best_ckpt}", f"input={spec}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: input={spec}: ")
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "preds.csv").exists()


def test_default_input_is_data_root_test_with_metrics(
    best_ckpt: Path, session_dataset: Path, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "out"
    cfg = predict_config(out, [f"ckpt={best_ckpt}", f"data.root={session_dataset}"])
    assert run_predict(cfg) == EXIT_OK
    stdout = caplog.text
    assert f"input: {session_dataset / 'test'} (20 files)" in stdout
    columns, rows = read_csv(out / "preds.csv")
    assert len(rows) == 20
    # metrics.json next to the CSV, the same numbers classification_metrics gives on the CSV
    metrics = json.loads((out / "metrics.json").read_text())
    probs = [float(r["prob_pneumonia"]) for r in rows]
    labels = [class_from_path(r["path"]) for r in rows]
    expected = classification_metrics(probs, labels, load_model(best_ckpt).threshold)
    for key in ("accuracy", "sensitivity", "specificity", "auroc"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-6)
    assert metrics["n"] == 20 and metrics["n_pos"] == 10 and metrics["n_failed"] == 0
    assert "accuracy" in stdout and "sensitivity" in stdout and "specificity" in stdout and "AUROC" in stdout


def test_default_input_missing_test_folder(best_ckpt: Path, tmp_path: Path, capsys) -> None:
    assert run_cli(tmp_path / "out", [f"ckpt={best_ckpt}", f"data.root={tmp_path / 'nodata'}"]) == 2
    assert f"the default test folder {tmp_path / 'nodata' / 'test'} does not exist" in capsys.readouterr().err


def test_no_metrics_without_class_folders(best_ckpt: Path, few_images: Path, tmp_path: Path) -> None:
    assert (
        run_predict(predict_config(tmp_path / "out", [f"ckpt={best_ckpt}", f"input={few_images}"])) == EXIT_OK
    )
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_class_from_path() -> None:
    assert class_from_path("data/test/PNEUMONIA/sub/x.jpeg") == 1
    assert class_from_path("/data/test/NORMAL/x.png") == 0
    assert class_from_path("/data/other/x.png") is None


# ---------------------------------------------------------------------------------- CSV and exit codes
def test_csv_rows_columns_and_exit_3(
    best_ckpt: Path, mixed_folder: Path, tmp_path: Path, capsys, caplog
) -> None:
    out = tmp_path / "out"
    assert (
        run_cli(out, [f"ckpt={best_ckpt}", f"input={mixed_folder}", "batch_size=4", "show=3"])
        == EXIT_SOME_FAILED
    )
    columns, rows = read_csv(out / "preds.csv")
    assert tuple(columns) == CSV_COLUMNS
    threshold = load_model(best_ckpt).threshold
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == 3 + len(ODD_IN_FOLDER)
    odd = make_odd_files(tmp_path / "names")  # only for the file names
    for key in ODD_IN_FOLDER:
        row = by_name[odd[key].name]
        assert ODD_REASONS[key] in row["error"]
        assert row["prob_pneumonia"] == "" and row["label"] == ""
        assert float(row["threshold"]) == pytest.approx(threshold)
    good = [r for r in rows if not r["error"]]
    assert len(good) == 3
    for row in good:
        prob = float(row["prob_pneumonia"])
        assert 0.0 <= prob <= 1.0
        assert row["label"] == ("PNEUMONIA" if prob >= threshold else "NORMAL")
        assert float(row["threshold"]) == pytest.approx(threshold)
    assert "predicted 3, failed 5 (of 8 files)" in caplog.text  # status lines are logged
    assert "... 5 more rows in the CSV" in capsys.readouterr().out  # show=3: the table is stdout
    # metrics: the good files sit in a folder that is not named by class
    assert not (out / "metrics.json").exists()


def test_threshold_override_sets_labels(best_ckpt: Path, few_images: Path, tmp_path: Path) -> None:
    for value, label in (("0.0", "PNEUMONIA"), ("1.0", "NORMAL")):
        out = tmp_path / value
        assert (
            run_predict(
                predict_config(out, [f"ckpt={best_ckpt}", f"input={few_images}", f"threshold={value}"])
            )
            == 0
        )
        _, rows = read_csv(out / "preds.csv")
        assert {r["label"] for r in rows} == {label}
        assert {float(r["threshold"]) for r in rows} == {float(value)}


def test_threshold_defaults_to_half_when_checkpoint_has_none(
    best_ckpt: Path, few_images: Path, tmp_path: Path
) -> None:
    checkpoint = load_checkpoint_file(best_ckpt)
    del checkpoint["xray"]["threshold"]
    path = tmp_path / "no_threshold.ckpt"
    torch.save(checkpoint, path)
    rows = predict_files(load_model(path), collect_inputs(few_images), device="cpu")
    assert {r.threshold for r in rows} == {0.5}


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("threshold=1.5", "threshold must be a number in"),
        ("batch_size=0", "batch_size must be"),
        ("device=tpu9", "is not a torch device"),
        ("warn.min_side=0", "warn.min_side must be"),
        ("warn.max_aspect=0.5", "warn.max_aspect must be"),
        ("ood=maybe", "ood must be true or false"),
    ],
)
def test_bad_settings_exit_2(
    override: str, match: str, best_ckpt: Path, few_images: Path, tmp_path: Path, capsys
) -> None:
    assert run_cli(tmp_path / "out", [f"ckpt={best_ckpt}", f"input={few_images}", override]) == 2
    assert match in capsys.readouterr().err


def test_valid_formats_all_predicted_exit_0(best_ckpt: Path, tmp_path: Path) -> None:
    folder = tmp_path / "formats"
    files = make_valid_files(folder)
    Image.fromarray(gradient_image()).save(folder / "gray.bmp")
    Image.fromarray(gradient_image()).save(folder / "gray.tif")
    assert run_cli(tmp_path / "out", [f"ckpt={best_ckpt}", f"input={folder}"]) == EXIT_OK
    _, rows = read_csv(tmp_path / "out" / "preds.csv")
    assert len(rows) == len(files) + 2
    assert all(r["error"] == "" and r["prob_pneumonia"] for r in rows)


def test_collate_separates_failures() -> None:
    image = torch.zeros(1, 4, 4, dtype=torch.uint8)
    info = ImageInfo(4, 4)
    images, index, failed, infos = collate_separating_failures(
        [(image, 0, info), ("bad", 1, None), (image, 2, info)]
    )
    assert images is not None and images.shape == (2, 1, 4, 4)
    assert index.tolist() == [0, 2] and failed == [(1, "bad")] and infos == {0: info, 2: info}
    images, index, failed, infos = collate_separating_failures([("bad", 5, None)])
    assert images is None and index.numel() == 0 and failed == [(5, "bad")] and infos == {}


def test_workers_keep_order_and_isolate_failures(best_ckpt: Path, mixed_folder: Path) -> None:
    model = load_model(best_ckpt)
    paths = collect_inputs(mixed_folder)
    serial = predict_files(model, paths, batch_size=3, num_workers=0, device="cpu")
    parallel = predict_files(model, paths, batch_size=3, num_workers=2, device="cpu")
    assert [r.path for r in serial] == [r.path for r in parallel] == [str(p) for p in paths]
    assert [r.error for r in serial] == [r.error for r in parallel]
    for a, b in zip(serial, parallel, strict=True):
        assert (a.prob_pneumonia is None) == (b.prob_pneumonia is None)
        if a.prob_pneumonia is not None:
            assert abs(a.prob_pneumonia - b.prob_pneumonia) < 1e-6


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = {"cuda"} if torch.cuda.is_available() else {"cpu", "mps"}
    assert resolve_device("auto").type in expected
    with pytest.raises(ConfigError):
        resolve_device("definitely-not-a-device")


# ------------------------------------------------------------------------------------------- checkpoints
def test_bad_checkpoints_exit_2(best_ckpt: Path, few_images: Path, tmp_path: Path, capsys) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(best_ckpt.read_bytes()[:2000])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, foreign)
    cases = {
        truncated: "checkpoint is truncated or corrupt",
        empty: "checkpoint is empty (0 bytes)",
        foreign: "not an xray checkpoint",
        tmp_path / "missing.ckpt": "checkpoint not found",
    }
    for path, message in cases.items():
        assert run_cli(tmp_path / "out", [f"ckpt={path}", f"input={few_images}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and message in err, err
        assert "Traceback" not in err


def test_malicious_checkpoint_is_refused_and_never_runs(few_images: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    save_malicious_checkpoint(evil, marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(evil)
    assert run_cli(tmp_path / "out", [f"ckpt={evil}", f"input={few_images}"]) == 2
    err = capsys.readouterr().err
    assert f"error: {evil}: refused to load" in err and "may be unsafe" in err
    assert not marker.exists()
    assert not (tmp_path / "out" / "preds.csv").exists()


def test_checkpoint_cannot_make_the_loader_download(monkeypatch, tmp_path: Path) -> None:
    """A crafted ``pretrained: true`` in the stored net config must not trigger a weights download."""
    from xray.models import TorchvisionNet

    def no_download(*args, **kwargs):
        raise AssertionError("load_model tried to download weights")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", no_download)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_download)
    net = TorchvisionNet("resnet18")
    path = tmp_path / "crafted.ckpt"
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "xray": {"net": {**net.config, "pretrained": True}, "preprocessing": {"image_size": 32}},
        },
        path,
    )
    loaded = load_model(path)
    assert isinstance(loaded.net, TorchvisionNet)


# ------------------------------------------------------------------------------------------- consistency
def _sharpened(best_ckpt: Path, images: Path, path: Path) -> Path:
    """The trained weights with the output layer rescaled so that the logits on ``images`` spread over
    about -4..4: probabilities then cover most of (0, 1), so a preprocessing difference cannot hide
    behind the nearly constant output of a briefly trained model."""
    model = load_model(best_ckpt)
    rows = predict_files(model, collect_inputs(images), device="cpu")
    # predict gives sigmoid(logit / T): back to the network's raw logits
    logits = (
        torch.logit(torch.tensor([r.prob_pneumonia for r in rows], dtype=torch.float64)) * model.temperature
    )
    scale = 8.0 / float(logits.max() - logits.min())
    center = float(logits.median())
    checkpoint = load_checkpoint_file(best_ckpt)
    state = checkpoint["state_dict"]
    weight = [k for k, v in state.items() if k.startswith("net.") and k.endswith("weight") and v.ndim == 2][
        -1
    ]
    bias = weight.removesuffix("weight") + "bias"
    state[weight] = state[weight] * scale
    state[bias] = (state[bias] - center) * scale
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(("variant", "tta"), [("trained", False), ("sharpened", False), ("sharpened", True)])
def test_predictions_equal_training_code_outputs(
    variant: str, tta: bool, best_ckpt: Path, session_dataset: Path, tmp_path: Path
) -> None:
    """predict_files == XRayClassifier's outputs in Lightning's test loop (cache, on_after_batch_transfer)."""
    import hydra
    import lightning as L

    from tests.helpers import compose_config

    ckpt = (
        best_ckpt
        if variant == "trained"
        else _sharpened(best_ckpt, session_dataset / "test", tmp_path / "sharp.ckpt")
    )
    cfg = compose_config(session_dataset, tmp_path / "run", [f"model.tta={tta}"])
    datamodule = hydra.utils.instantiate(cfg.data)
    lit = hydra.utils.instantiate(cfg.model)
    lit.load_state_dict(load_checkpoint_file(ckpt)["state_dict"])
    lit.temperature = load_model(ckpt).temperature  # the calibration stored with the weights
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.test(lit, datamodule=datamodule, verbose=False)
    probs, _, index = lit.collected()
    records = datamodule.datasets["test"].records
    expected = {str(records[i].path): float(p) for p, i in zip(probs.tolist(), index.tolist(), strict=True)}

    model = load_model(ckpt)
    assert (model.image_size, model.interpolation) == (cfg.data.image_size, cfg.data.interpolation)
    rows = predict_files(model, collect_inputs(session_dataset / "test"), batch_size=7, device="cpu", tta=tta)
    got = {r.path: r.prob_pneumonia for r in rows}
    assert set(got) == set(expected) and len(got) == 20
    diff = max(abs(got[p] - expected[p]) for p in got)
    print(f"consistency {variant} tta={tta}: max |predict - training| = {diff:.3e}")
    assert diff < 1e-5
    if variant == "sharpened":
        # the check above is a sensitive one: the probabilities spread, and the wrong resize filter shows
        assert max(got.values()) - min(got.values()) > 0.5
        model.meta["preprocessing"]["interpolation"] = "nearest"
        wrong = predict_files(model, list(got), device="cpu", tta=tta)
        assert max(abs(r.prob_pneumonia - expected[r.path]) for r in wrong) > 1e-3


# ---------------------------------------------------------------------------------------------- grad-cam
def test_gradcam_writes_one_png_per_predicted_image(
    best_ckpt: Path, few_images: Path, tmp_path: Path
) -> None:
    folder = few_images
    (folder / "broken.png").write_bytes(b"")
    out = tmp_path / "out"
    assert run_predict(predict_config(out, [f"ckpt={best_ckpt}", f"input={folder}", "gradcam=true"])) == 3
    pngs = sorted((out / "gradcam").glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_gradcam_maps_are_normalised_heatmaps(best_ckpt: Path) -> None:
    model = load_model(best_ckpt)
    images = torch.randint(0, 256, (2, 1, model.image_size, model.image_size), dtype=torch.uint8)
    heat = GradCam(model.net).maps(images)
    assert heat.shape == (2, model.image_size, model.image_size)
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0 + 1e-6
    assert GradCam(model.net).gradcam.layer is last_conv2d(model.net)


# ---------------------------------------------------------------------------------- predict.py process
def _run_predict_py(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_script("predict.py", args, cwd=cwd)


def test_predict_py_end_to_end_exit_3(trained_run: Path, mixed_folder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    proc = _run_predict_py(
        [f"ckpt={trained_run}", f"input={mixed_folder}", f"paths.log_dir={logs}"], tmp_path
    )
    assert proc.returncode == EXIT_SOME_FAILED, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"checkpoint: {trained_run / 'checkpoints' / 'best_xray_model.ckpt'}" in proc.stdout
    assert "predicted 3, failed 5 (of 8 files)" in proc.stdout
    (run_dir,) = (logs / "predict" / "runs").iterdir()
    columns, rows = read_csv(run_dir / "preds.csv")
    assert tuple(columns) == CSV_COLUMNS and len(rows) == 8
    assert sum(1 for r in rows if r["error"]) == 5


def test_predict_py_refuses_malicious_checkpoint(few_images: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    save_malicious_checkpoint(evil, marker)
    proc = _run_predict_py(
        [f"ckpt={evil}", f"input={few_images}", f"paths.log_dir={tmp_path / 'logs'}"], tmp_path
    )
    assert proc.returncode == 2
    assert f"error: {evil}: refused to load" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not marker.exists()


# ------------------------------------------------------------------- OOD score, warnings, new formats
def test_ood_score_and_warning_columns(best_ckpt: Path, few_images: Path, tmp_path: Path, caplog) -> None:
    """Odd inputs are still predicted, and say why they are odd; the summary counts the warnings."""
    folder = tmp_path / "odd_inputs"
    shutil.copytree(few_images, folder)
    Image.fromarray(gradient_image(3, 3)).save(folder / "tiny.png")
    Image.fromarray(noise_image(300, 8, seed=1)).save(folder / "strip.webp", lossless=True)
    frames = [Image.fromarray(np.full((80, 80), v, np.uint8)) for v in (40, 160)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    out = tmp_path / "out"
    assert run_cli(out, [f"ckpt={best_ckpt}", f"input={folder}"]) == EXIT_OK
    printed = caplog.text
    columns, rows = read_csv(out / "preds.csv")
    assert columns[-3:] == ["ood_score", "warning", "error"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == 6 and all(r["prob_pneumonia"] and r["ood_score"] for r in rows)
    assert "smaller than the minimum size (3x3 px" in by_name["tiny.png"]["warning"]
    assert "extreme aspect ratio (8x300, 37.5:1" in by_name["strip.webp"]["warning"]
    assert "more than one frame (2 frames; the first was used)" in by_name["anim.gif"]["warning"]
    assert "outside the training distribution" in by_name["strip.webp"]["warning"]  # noise: far from films
    for row in rows:
        flagged = float(row["ood_score"]) > 1.0
        assert flagged == ("outside the training distribution" in row["warning"])
    n_warned = sum(1 for r in rows if r["warning"])
    assert f"warnings: {n_warned} of 6 predicted files (outside the training distribution" in printed
    assert (
        "smaller than the minimum size 2, extreme aspect ratio 1, more than one frame 1)" in printed
    )  # strip: 8 px


def test_warning_limits_are_settings(best_ckpt: Path, tmp_path: Path) -> None:
    p = png(tmp_path / "in" / "small.png")  # 64x48
    rows = predict_files(load_model(best_ckpt), [p], device="cpu", limits=WarningLimits(min_side=49))
    assert "small" in rows[0].warnings
    rows = predict_files(load_model(best_ckpt), [p], device="cpu", limits=WarningLimits(min_side=48))
    assert "small" not in rows[0].warnings


def test_checkpoint_without_ood_stats_still_predicts(
    best_ckpt: Path, few_images: Path, tmp_path: Path, caplog
) -> None:
    checkpoint = load_checkpoint_file(best_ckpt)
    del checkpoint["xray"]["ood"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    out = tmp_path / "out"
    assert run_cli(out, [f"ckpt={old}", f"input={few_images}"]) == EXIT_OK
    assert "has no OOD statistics" in caplog.text
    _, rows = read_csv(out / "preds.csv")
    assert all(r["prob_pneumonia"] and r["ood_score"] == "" for r in rows)
    rows_off = predict_files(load_model(best_ckpt), collect_inputs(few_images), device="cpu", ood=False)
    assert all(r.ood_score is None for r in rows_off)


def test_exif_rotated_photo_predicts_like_the_upright_one(best_ckpt: Path, tmp_path: Path) -> None:
    """A film photographed sideways with EXIF "rotate 90" is scored as the upright picture."""
    rng = np.random.default_rng(5)
    upright = np.clip(rng.normal(100, 30, (96, 64)), 0, 255).astype(np.uint8)
    upright[:30] = 220  # not symmetric: reading it sideways changes what the network sees
    exif = Image.Exif()
    exif[0x0112] = 6
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(
        folder / "sideways.png", exif=exif.tobytes()
    )
    Image.fromarray(upright).save(folder / "upright.png")
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(folder / "no_exif.png")
    rows = {
        Path(r.path).name: r
        for r in predict_files(load_model(best_ckpt), collect_inputs(folder), device="cpu")
    }
    assert rows["sideways.png"].prob_pneumonia == pytest.approx(rows["upright.png"].prob_pneumonia, abs=1e-6)
    assert rows["no_exif.png"].prob_pneumonia != pytest.approx(rows["upright.png"].prob_pneumonia, abs=1e-6)


def test_folder_scan_finds_webp_and_gif(tmp_path: Path) -> None:
    folder = tmp_path / "scan"
    folder.mkdir()
    for name in ("a.webp", "b.GIF", "c.png"):
        Image.fromarray(gradient_image()).save(folder / name)
    (folder / "notes.txt").write_text("x")
    assert [p.name for p in collect_inputs(folder)] == ["a.webp", "b.GIF", "c.png"]
