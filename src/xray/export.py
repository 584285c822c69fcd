"""``python -m xray.export ckpt=... format=onnx output=model.onnx`` (Hydra, conf/export.yaml): the whole
predictor as one ONNX or TorchScript file plus a JSON of its preprocessing, threshold and labels."""

from __future__ import annotations

from typing import Any

from xray.cli import hydra_entry
from xray.core.config_checks import ConfigError
from xray.inference.export import check_format, export_model, verify_export
from xray.inference.predictor import load_predictor
from xray.inference.site import check_site_profile, load_site_profile


def run_export(cfg: Any) -> int:
    """``python -m xray.export``: load ``ckpt``, write the model and its JSON, verify."""
    fmt, tta, ood = str(cfg.format), cfg.get("tta"), bool(cfg.get("ood", True))
    check_format(fmt)
    if tta is not None and not isinstance(tta, bool):
        raise ConfigError(f"tta must be true, false or null (checkpoint's), got {tta!r}")
    predictor = load_predictor(str(cfg.ckpt), cfg.log_dir)
    site = load_site_profile(str(cfg.site)) if cfg.get("site") else None
    if site is not None:  # the exported JSON describes the encoding step: the profile's logits need it
        check_site_profile(site, predictor, tta=tta, match_encoding=True)
    output = cfg.get("output") or ("model.onnx" if fmt == "onnx" else "model.pt")
    if predictor.ood_stats is None and ood:
        print(
            "note: the checkpoint has no OOD statistics: no ood_score output (python -m xray.ood fits them)"
        )
    path, meta_path = export_model(
        predictor, output, fmt, tta=tta, ood=ood, opset=int(cfg.opset), cfg=cfg, site=site
    )
    print(f"checkpoint: {predictor.source}")
    if site is not None:
        print(f"site profile: {site.summary()}; in the graph's prob_pneumonia and the JSON's threshold")
    print(f"model: {path} ({path.stat().st_size / 1e6:.1f} MB, {fmt}); preprocessing and labels: {meta_path}")
    if cfg.get("verify", True):
        try:
            diff = verify_export(predictor, path, fmt, tta, ood, site)
        except ImportError:
            print('verify: skipped (onnxruntime is not installed: pip install -e ".[export]")')
        else:
            print(f"verify: max |difference| against PyTorch on a seeded batch: {diff:.2e}")
            if diff > 1e-4:
                raise ConfigError(f"{path}: the exported model differs from PyTorch by {diff:.2e} (> 1e-4)")
    return 0


def main() -> None:
    """``python -m xray.export key=value ...`` (Hydra, conf/export.yaml); user errors exit 2 with one line."""
    hydra_entry("export", run_export)


if __name__ == "__main__":
    main()
