"""A deployable model that needs neither this package nor PyTorch (``python -m xray.export``).

The graph holds the whole predictor (each member with its flip TTA, the mean logit, the temperature,
the OOD score): input ``image`` float32 (N, 1, S, S) in [0, 1], prepared as ``predict.py`` does;
outputs ``prob_pneumonia``, ``logit`` and, when every member has OOD statistics, ``ood_score``.
``<output>.json`` describes the preprocessing, threshold, labels and warning limits. ONNX uses the
TorchScript-based exporter (``dynamo=False``: offline, deterministic); ``verify=true`` checks the
written file against PyTorch on a seeded batch.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xray.core.config_checks import ConfigError
from xray.core.constants import CLASSES
from xray.inference.ood import logits_and_features
from xray.inference.predictor import Predictor
from xray.inference.site import SiteProfile

EXPORT_FORMAT = 1
FORMATS = ("onnx", "torchscript")
OUTPUT_NAMES = ("prob_pneumonia", "logit", "ood_score")


class ExportedPredictor(nn.Module):
    """A :class:`~xray.inference.predictor.Predictor` as one module: image in, probability (+ logit, OOD score) out.
    With a site profile, ``prob_pneumonia`` is the site's: ``sigmoid(logit / T_site + offset)``."""

    def __init__(
        self, predictor: Predictor, tta: bool | None = None, ood: bool = True, site: SiteProfile | None = None
    ) -> None:
        super().__init__()
        if len(predictor.preprocessing) != 1:
            raise ConfigError(
                f"export: the members use different preprocessing {predictor.preprocessing}; "
                "one exported graph takes one input size"
            )
        self.nets = nn.ModuleList([m.net.float().eval() for m in predictor.members])
        self.ttas = [m.tta if tta is None else bool(tta) for m in predictor.members]
        self.temperature = float(predictor.temperature if site is None else site.temperature)
        self.offset = 0.0 if site is None else float(site.offset)
        self.stats = predictor.ood_stats if ood else None
        self.with_ood = self.stats is not None
        self.output_names = list(OUTPUT_NAMES if self.with_ood else OUTPUT_NAMES[:2])

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        outputs = [logits_and_features(net, image, self.ttas[k]) for k, net in enumerate(self.nets)]
        logit = torch.stack([z for z, _ in outputs]).mean(0)
        scaled = logit / self.temperature
        prob = torch.sigmoid(scaled if self.offset == 0.0 else scaled + self.offset)
        if self.stats is None:
            return prob, logit
        scores = [s.score(f) for s, (_, f) in zip(self.stats, outputs, strict=True)]
        return prob, logit, torch.stack(scores).mean(0).float()


def _site_section(predictor: Predictor, site: SiteProfile | None) -> dict[str, Any] | None:
    """The applied site profile, for the JSON: which one, and what it replaced."""
    if site is None:
        return None
    return {
        "profile": site.path.name if site.path is not None else None,
        "label": site.label,
        "fingerprint": site.fingerprint,
        "created": site.data.get("created"),
        "temperature": site.temperature,
        "offset": site.offset,
        "threshold": site.threshold,
        "prevalence": site.prevalence,
        "in_graph": "prob_pneumonia = sigmoid(logit / temperature + offset); logit stays the raw mean logit",
        "model_temperature": float(predictor.temperature),
        "model_threshold": float(predictor.threshold),
    }


def export_metadata(
    predictor: Predictor,
    module: ExportedPredictor,
    model_file: str,
    fmt: str,
    cfg: Any,
    site: SiteProfile | None = None,
) -> dict[str, Any]:
    """The JSON a deployment reads beside the model: how to prepare the input and read the outputs."""
    size, interpolation, encoding = predictor.preprocessing[0]
    stats = predictor.ood_stats if module.with_ood else None
    warn = cfg.get("warn") or {}
    return {
        "format": EXPORT_FORMAT,
        "model": model_file,
        "model_format": fmt,
        "source": predictor.source,
        "members": len(predictor.members),
        "input": {"name": "image", "dtype": "float32", "shape": ["N", 1, size, size], "range": [0.0, 1.0]},
        "outputs": module.output_names,
        "preprocessing": {
            "source_encoding": None
            if encoding is None
            else {
                **encoding.to_meta(),
                "step": "first: resize to width x height (bilinear, antialiased), JPEG at this quality, decode",
            },
            "image_size": size,
            "interpolation": interpolation,
            "antialias": True,
            "aspect": "ignored: the whole image is resized to a square",
            "grayscale": "one channel; colour through ITU-R 601-2 luma (Pillow convert('L')), alpha dropped",
            "exif_orientation": "applied (JPEG/PNG/WebP/TIFF); DICOM: modality then VOI LUT, min/max to 0..255",
            "rescale": 1.0 / 255.0,
            "tta": "inside the graph" if any(module.ttas) else "none",
        },
        "threshold": float(predictor.threshold if site is None else site.threshold),
        "temperature": float(predictor.temperature if site is None else site.temperature),
        "site": _site_section(predictor, site),
        "labels": {str(i): name for i, name in enumerate(CLASSES)},
        "decision": f"{CLASSES[1]} when prob_pneumonia >= threshold, else {CLASSES[0]}",
        "ood": None
        if stats is None
        else {
            "threshold": float(predictor.ood_threshold),
            "score": "mean over members of sqrt(PPCA Mahalanobis distance^2 / D) / member threshold",
            "flag": "ood_score > threshold: outside the training distribution (the prediction is still given)",
            "acceptance": stats[0].acceptance,
            "per_member": [
                {
                    "threshold": s.threshold,
                    "feature_dim": s.dim,
                    "components": int(s.components.shape[0]),
                    "residual_variance": s.residual_variance,
                    "n_fit": s.n_fit,
                    "n_val": s.n_val,
                    "fitted_on": s.fitted_on,
                }
                for s in stats
            ],
        },
        "warnings": {
            "min_side": int(warn.get("min_side", 64)),
            "max_aspect": float(warn.get("max_aspect", 3.0)),
            "frames": "warn when a file holds more than one frame (the first is used)",
        },
        "exporter": {
            "torch": torch.__version__,
            "opset": int(cfg.get("opset", 17)) if fmt == "onnx" else None,
        },
    }


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _seeded_images(predictor: Predictor, n: int, seed: int) -> Tensor:
    size = predictor.preprocessing[0][0]
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def export_model(
    predictor: Predictor,
    output: str | os.PathLike[str],
    fmt: str = "onnx",
    tta: bool | None = None,
    ood: bool = True,
    opset: int = 17,
    cfg: Any = None,
    site: SiteProfile | None = None,
) -> tuple[Path, Path]:
    """Write the model file and its JSON (``<output>.json``); returns both paths. ``site``: a checked site
    profile folded into ``prob_pneumonia`` and the JSON's threshold."""
    check_format(fmt)
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    module = ExportedPredictor(predictor, tta=tta, ood=ood, site=site).eval()
    example = _seeded_images(predictor, 2, seed=0)
    names = module.output_names
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (the exporter needs it)
        except ImportError:
            raise ConfigError('format=onnx needs the onnx package: pip install -e ".[export]"') from None
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings of the TF-style padding: sizes are fixed here
            if fmt == "onnx":
                torch.onnx.export(
                    module,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    input_names=["image"],
                    output_names=names,
                    dynamic_axes={"image": {0: "N"}, **{n: {0: "N"} for n in names}},
                    opset_version=int(opset),
                )
            else:
                traced = torch.jit.trace(module, (example,), check_trace=False)
                torch.jit.save(traced, str(tmp))
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta = export_metadata(predictor, module, output.name, fmt, cfg or {}, site=site)
    meta_path = output.with_name(output.name + ".json")
    meta_path.write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return output, meta_path


def run_exported(path: str | os.PathLike[str], images: Tensor, fmt: str = "onnx") -> dict[str, Tensor]:
    """The written file on float images (N,1,S,S): {output name: tensor}; onnxruntime for ONNX."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        values = session.run(None, {"image": images.float().numpy()})
        return {o.name: torch.from_numpy(v) for o, v in zip(session.get_outputs(), values, strict=True)}
    module = torch.jit.load(str(path))
    with torch.no_grad():
        values = module(images.float())
    return dict(zip(OUTPUT_NAMES, values, strict=False))


def verify_export(
    predictor: Predictor, path: Path, fmt: str, tta: bool | None, ood: bool, site: SiteProfile | None = None
) -> float:
    """Max |difference| of every output between the written file and PyTorch on a seeded batch."""
    module = ExportedPredictor(predictor, tta=tta, ood=ood, site=site).eval()
    images = _seeded_images(predictor, 3, seed=1)
    with torch.no_grad():
        expected = dict(zip(OUTPUT_NAMES, module(images), strict=False))
    got = run_exported(path, images, fmt)
    return max(float((got[k].double() - v.double()).abs().max()) for k, v in expected.items())
