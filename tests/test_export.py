"""``python -m xray.export``: the ONNX / TorchScript file gives predict.py's probabilities and OOD scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import compose_hydra
from xray.core.checkpoint_io import atomic_torch_save, load_checkpoint_file
from xray.core.config_checks import ConfigError
from xray.core.constants import CLASSES
from xray.data.transforms import load_resized, rescale
from xray.export import run_export
from xray.inference.export import export_model, run_exported
from xray.inference.predict import collect_inputs, predict_files
from xray.inference.predictor import load_predictor, update_ensemble_manifest, write_ensemble_manifest


@pytest.fixture(scope="module")
def ensemble_dir(best_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two members (the second with perturbed weights and a 1.3 temperature) and a manifest."""
    folder = tmp_path_factory.mktemp("ens")
    shutil.copy(best_ckpt, folder / "a.ckpt")
    ckpt = load_checkpoint_file(best_ckpt)
    gen = torch.Generator().manual_seed(0)
    ckpt["state_dict"] = {
        k: v + 0.002 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in ckpt["state_dict"].items()
    }
    atomic_torch_save(ckpt, folder / "b.ckpt")
    write_ensemble_manifest(folder, ["a.ckpt", "b.ckpt"], 0.4, 1.3, "test")
    update_ensemble_manifest(folder, ood={"threshold": 1.2})
    return folder


def _images(session_dataset: Path) -> list[Path]:
    return collect_inputs(session_dataset / "test")


def _onnx_vs_predict(spec: str | Path, out: Path, images: list[Path]) -> tuple[float, float, dict]:
    """(max |prob difference|, max relative OOD-score difference, the JSON) of the ONNX file vs predict_files."""
    ort = pytest.importorskip("onnxruntime")
    assert ort is not None
    predictor = load_predictor(str(spec))
    model_path, meta_path = export_model(predictor, out, "onnx")
    meta = json.loads(meta_path.read_text())
    size = meta["preprocessing"]["image_size"]
    batch = torch.stack(
        [torch.from_numpy(load_resized(p, size, meta["preprocessing"]["interpolation"])) for p in images]
    )
    got = run_exported(model_path, rescale(batch.unsqueeze(1)), "onnx")
    rows = predict_files(predictor, images, batch_size=8, device="cpu")
    prob_diff = float(
        np.max(np.abs(got["prob_pneumonia"].numpy() - np.array([r.prob_pneumonia for r in rows])))
    )
    expected_ood = np.array([r.ood_score for r in rows])
    probs = got["prob_pneumonia"].numpy()
    assert np.ptp(probs) > 0 and ((probs > 0.01) & (probs < 0.99)).any()  # real, unsaturated outputs
    ood_diff = float(np.max(np.abs(got["ood_score"].numpy() - expected_ood) / np.maximum(1.0, expected_ood)))
    labels = [meta["labels"][str(int(p >= meta["threshold"]))] for p in got["prob_pneumonia"].tolist()]
    assert labels == [r.label for r in rows]
    return prob_diff, ood_diff, meta


def test_onnx_matches_predict_single_model(best_ckpt: Path, session_dataset: Path, tmp_path: Path) -> None:
    images = _images(session_dataset)
    prob_diff, ood_diff, meta = _onnx_vs_predict(best_ckpt, tmp_path / "m.onnx", images)
    assert prob_diff < 1e-4 and ood_diff < 1e-4
    stored = load_checkpoint_file(best_ckpt)["xray"]
    assert meta["preprocessing"]["image_size"] == stored["preprocessing"]["image_size"]
    assert meta["preprocessing"]["rescale"] == pytest.approx(1 / 255)
    encoding, recorded = meta["preprocessing"]["source_encoding"], stored["preprocessing"]["source_encoding"]
    assert {k: encoding[k] for k in ("width", "height", "quality")} == recorded
    assert meta["threshold"] == pytest.approx(stored["threshold"])
    assert meta["temperature"] == pytest.approx(stored["temperature"])
    assert meta["labels"] == {"0": CLASSES[0], "1": CLASSES[1]}
    assert meta["outputs"] == ["prob_pneumonia", "logit", "ood_score"]
    assert meta["ood"]["threshold"] == 1.0 and meta["ood"]["per_member"][0]["threshold"] > 0


def test_onnx_matches_predict_ensemble(ensemble_dir: Path, session_dataset: Path, tmp_path: Path) -> None:
    prob_diff, ood_diff, meta = _onnx_vs_predict(ensemble_dir, tmp_path / "e.onnx", _images(session_dataset))
    assert prob_diff < 1e-4 and ood_diff < 1e-4
    assert meta["members"] == 2 and meta["threshold"] == 0.4 and meta["temperature"] == 1.3
    assert meta["ood"]["threshold"] == 1.2 and len(meta["ood"]["per_member"]) == 2


def test_torchscript_matches_pytorch(best_ckpt: Path, session_dataset: Path, tmp_path: Path) -> None:
    predictor = load_predictor(str(best_ckpt))
    path, _ = export_model(predictor, tmp_path / "m.pt", "torchscript")
    images = _images(session_dataset)[:6]
    size, interpolation, _ = predictor.preprocessing[0]
    batch = torch.stack([torch.from_numpy(load_resized(p, size, interpolation)) for p in images]).unsqueeze(1)
    got = run_exported(path, rescale(batch), "torchscript")
    rows = predict_files(predictor, images, device="cpu")
    np.testing.assert_allclose(got["prob_pneumonia"].numpy(), [r.prob_pneumonia for r in rows], atol=1e-5)


def test_checkpoint_without_ood_stats_exports_two_outputs(best_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    ckpt = load_checkpoint_file(best_ckpt)
    del ckpt["xray"]["ood"]
    old = tmp_path / "old.ckpt"
    atomic_torch_save(ckpt, old)
    path, meta_path = export_model(load_predictor(str(old)), tmp_path / "old.onnx", "onnx")
    meta = json.loads(meta_path.read_text())
    assert meta["ood"] is None and meta["outputs"] == ["prob_pneumonia", "logit"]
    size = meta["preprocessing"]["image_size"]
    assert set(run_exported(path, torch.rand(2, 1, size, size), "onnx")) == {"prob_pneumonia", "logit"}


def test_cli_writes_verifies_and_rejects_bad_format(best_ckpt: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "cli" / "model.onnx"
    cfg = compose_hydra("export", tmp_path / "run", [f"ckpt={best_ckpt}", f"output={out}"])
    assert run_export(cfg) == 0
    printed = capsys.readouterr().out
    assert "verify: max |difference| against PyTorch" in printed
    assert out.is_file() and out.with_name("model.onnx.json").is_file()
    cfg = compose_hydra("export", tmp_path / "run2", [f"ckpt={best_ckpt}", "format=tflite"])
    with pytest.raises(ConfigError, match="format must be one of"):
        run_export(cfg)
