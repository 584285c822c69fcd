"""What ``predict.py`` does, callable from Python: files in, one :class:`PredictionRow` per file out.

Files go through the training code's eval preprocessing (size and interpolation from the checkpoint),
so a file is scored as validation scores it. An unreadable file gets an error row and never stops the
run. Exit codes: ``EXIT_OK``, ``EXIT_SOME_FAILED``; user errors raise (exit 2 via ``fail_cleanly``).
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from xray.core.atomic import atomic_write_csv
from xray.core.config_checks import ConfigError, is_int, is_num
from xray.core.constants import CLASS_TO_INDEX, CLASSES, IMAGE_EXTENSIONS
from xray.core.runtime import keep_freed_memory
from xray.data.encoding import SourceEncoding, match_file_encoding
from xray.data.io import ImageInfo, ImageReadError, read_image_info
from xray.data.records import find_images
from xray.data.transforms import rescale, resize_image
from xray.evaluation.calibration import apply_temperature
from xray.evaluation.metrics import classification_metrics
from xray.evaluation.report import write_metrics_json
from xray.inference.checkpoints import LoadedModel
from xray.inference.gradcam import GradCam
from xray.inference.ood import FeatureGaussian, combine_scores, logits_and_features
from xray.inference.predictor import Predictor, load_predictor
from xray.inference.site import SiteProfile, apply_site, check_site_profile, load_site_profile
from xray.models import flip_tta_logits

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_SOME_FAILED = 3  # some files could not be read (their rows carry the reason)

CSV_COLUMNS = ("path", "prob_pneumonia", "label", "threshold", "ood_score", "warning", "error")
SITE_COLUMN = "site"  # appended to CSV_COLUMNS when a site profile was applied (site=)
_GLOB_CHARS = frozenset("*?[")

WARNING_KINDS: dict[str, str] = {
    "ood": "outside the training distribution",
    "small": "smaller than the minimum size",
    "aspect": "extreme aspect ratio",
    "frames": "more than one frame",
}
"""The warnings a predicted row can carry (the prediction is still given), in CSV order."""


@dataclass(frozen=True)
class WarningLimits:
    """When an input is odd enough to warn about: ``min_side`` px, ``max_aspect`` long/short side."""

    min_side: int = 64
    max_aspect: float = 3.0


def input_warnings(
    info: ImageInfo | None,
    ood_score: float | None,
    ood_threshold: float,
    limits: WarningLimits = WarningLimits(),
) -> dict[str, str]:
    """{kind: text} of :data:`WARNING_KINDS` for one predicted file (empty when nothing is odd)."""
    found: dict[str, str] = {}
    if ood_score is not None and ood_score > ood_threshold:
        found["ood"] = f"{WARNING_KINDS['ood']} (ood_score {ood_score:.2f} > {ood_threshold:.2f})"
    if info is not None:
        short, long = sorted((info.width, info.height))
        size = f"{info.width}x{info.height}"
        if short < limits.min_side:
            found["small"] = f"{WARNING_KINDS['small']} ({size} px, a side under {limits.min_side})"
        if long / short > limits.max_aspect:
            found["aspect"] = (
                f"{WARNING_KINDS['aspect']} ({size}, {long / short:.1f}:1 > {limits.max_aspect:g}:1)"
            )
        if info.frames > 1:
            found["frames"] = f"{WARNING_KINDS['frames']} ({info.frames} frames; the first was used)"
    return found


class InputError(ConfigError):
    """``input=`` names nothing to predict (missing path, empty folder, glob without matches)."""


@dataclass
class PredictionRow:
    """One input file: its probability and label at ``threshold``, or why it could not be read."""

    path: str
    prob_pneumonia: float | None
    label: str | None
    threshold: float
    error: str | None = None
    true_label: int | None = None  # from a NORMAL/PNEUMONIA parent folder; not written to the CSV
    gradcam: str | None = None
    ood_score: float | None = None  # None: no OOD statistics in the checkpoint, or an error row
    warnings: dict[str, str] = field(default_factory=dict)  # kind of WARNING_KINDS -> text
    logit: float | None = None  # the members' mean raw logit (before any temperature); not in the CSV
    site: str | None = None  # the site profile applied to this row (its label), the CSV's site column

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def warning(self) -> str:
        """The CSV's ``warning`` cell: every warning's text, ``; ``-separated."""
        return "; ".join(self.warnings[k] for k in WARNING_KINDS if k in self.warnings)


def prediction_row(
    path: str,
    prob: float | None,
    threshold: float,
    *,
    error: str | None = None,
    ood_score: float | None = None,
    info: ImageInfo | None = None,
    ood_threshold: float = 1.0,
    limits: WarningLimits = WarningLimits(),
    gradcam: str | None = None,
) -> PredictionRow:
    """One input's row, as predict.py and the server both give it: the label at ``threshold`` and the
    warnings when it has a probability, else ``error`` (``not predicted`` when none is given)."""
    if prob is None:
        return PredictionRow(
            path, None, None, threshold, error=error or "not predicted", true_label=class_from_path(path)
        )
    return PredictionRow(
        path=path,
        prob_pneumonia=prob,
        label=CLASSES[int(prob >= threshold)],
        threshold=threshold,
        error=error,
        true_label=class_from_path(path),
        gradcam=gradcam,
        ood_score=ood_score,
        warnings=input_warnings(info, ood_score, ood_threshold, limits),
    )


# ----------------------------------------------------------------------------------------------- inputs
def _expand(path: Path) -> list[Path]:
    """A folder's image files; a named file as it is (attempted whatever its extension)."""
    return find_images(path) if path.is_dir() else [path]


def _read_list_file(list_file: Path) -> list[Path]:
    """One path per line; relative ones are relative to the list file; blanks and ``#`` lines skipped."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"input={list_file}: cannot read the list file ({err})") from None
    entries = (line.strip() for line in text.splitlines())
    # joining an absolute path gives that path
    return [
        p
        for e in entries
        if e and not e.startswith("#")
        for p in _expand(list_file.parent / Path(e).expanduser())
    ]


def collect_inputs(spec: str | os.PathLike[str]) -> list[Path]:
    """Files to predict from ``input=``: a file, a folder (recursive), a glob, or a ``.txt`` list."""
    spec_str = os.fspath(spec)
    path = Path(spec_str).expanduser()
    if not path.exists() and _GLOB_CHARS & set(spec_str):
        matches = sorted(glob.glob(os.path.expanduser(spec_str), recursive=True))
        paths, empty = [p for m in matches for p in _expand(Path(m))], "the pattern matches no files"
    elif not path.exists():
        raise InputError(f"input={spec_str}: no such file or directory")
    elif path.is_dir():
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        paths, empty = find_images(path), f"folder holds no image files (searched recursively for {exts})"
    elif path.suffix.lower() == ".txt":
        paths, empty = _read_list_file(path), "the list file names no files (blank and # lines are skipped)"
    else:
        return [path]
    if not paths:
        raise InputError(f"input={spec_str}: {empty}")
    return paths


def class_from_path(path: str | os.PathLike[str]) -> int | None:
    """Label from the nearest parent folder named NORMAL or PNEUMONIA (the Kermany layout), else None."""
    for parent in Path(os.path.abspath(path)).parents:
        if parent.name in CLASS_TO_INDEX:
            return CLASS_TO_INDEX[parent.name]
    return None


# --------------------------------------------------------------------------------------------- batching
def prepare_image(
    image: Tensor,
    source: str | os.PathLike[str] | BinaryIO,
    image_size: int,
    interpolation: str,
    source_encoding: SourceEncoding | None = None,
) -> Tensor:
    """A decoded film -> one member's uint8 (1,S,S) input: the training files' encoding first (unless
    ``source``, the file or an in-memory copy of it, already has it), then the eval resize."""
    if source_encoding is not None:
        image = match_file_encoding(source, image, source_encoding)  # type: ignore[arg-type]  # a file object too
    return resize_image(image, image_size, interpolation)


class PredictDataset(Dataset):
    """Files through the eval preset; an unreadable file gives its reason instead of raising."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        image_size: int,
        interpolation: str,
        source_encoding: SourceEncoding | None = None,
    ) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.source_encoding = source_encoding

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor | str, int, ImageInfo | None]:
        try:
            image, info = read_image_info(self.paths[index])
            resized = prepare_image(
                image, self.paths[index], self.image_size, self.interpolation, self.source_encoding
            )
        except ImageReadError as err:
            return err.reason, index, None
        except Exception as err:  # one odd file must not take the other files of its batch down
            return f"cannot read image: {type(err).__name__}: {str(err)[:300]}", index, None
        return resized, index, info


def collate_separating_failures(
    items: Sequence[tuple[Tensor | str, int, ImageInfo | None]],
) -> tuple[Tensor | None, Tensor, list[tuple[int, str]], dict[int, ImageInfo]]:
    """(images (B,1,S,S) or None when all failed, their indices, [(index, reason)], {index: ImageInfo})."""
    good = [(item[0], item[1]) for item in items if isinstance(item[0], Tensor)]
    failed = [(item[1], item[0]) for item in items if isinstance(item[0], str)]
    infos = {item[1]: item[2] for item in items if len(item) > 2 and item[2] is not None}
    images = torch.stack([image for image, _ in good]) if good else None
    return images, torch.tensor([index for _, index in good], dtype=torch.long), failed, infos


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; otherwise any torch device string."""
    if spec is None or str(spec) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(str(spec))
    except RuntimeError as err:
        raise ConfigError(f"device={spec!r} is not a torch device ({err}); use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec}: CUDA is not available on this machine; use device=auto or cpu")
    return device


def member_logits(net: nn.Module, images: Tensor, tta: bool) -> Tensor:
    """uint8 (B,1,S,S) -> raw logits (B,) float32: rescale, the network (mean over the flip if TTA)."""
    x = rescale(images)
    logits = flip_tta_logits(net, x) if tta else net(x)
    return logits.float().reshape(-1)


def member_outputs(
    net: nn.Module, images: Tensor, tta: bool, stats: FeatureGaussian | None
) -> tuple[Tensor, Tensor | None]:
    """One member on a uint8 batch: its raw logits (B,) and, with OOD statistics, its OOD scores (B,),
    from the same pass."""
    if stats is None:
        return member_logits(net, images, tta), None
    logits, features = logits_and_features(net, rescale(images), tta)
    return logits, stats.score(features.cpu())


def _loader(dataset: PredictDataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(int(num_workers), math.ceil(len(dataset) / batch_size)),
        collate_fn=collate_separating_failures,
        pin_memory=device.type == "cuda",
    )


def preprocessing_groups(
    predictor: Predictor, match_encoding: bool = True
) -> list[tuple[tuple[int, str, SourceEncoding | None], list[int]]]:
    """Member indices per distinct preprocessing (one decode each). The first member's group comes
    last, so its Grad-CAM titles can show the whole ensemble's probability."""
    groups: dict[tuple[int, str, SourceEncoding | None], list[int]] = {}
    for k, member in enumerate(predictor.members):
        encoding = member.source_encoding if match_encoding else None
        groups.setdefault((member.image_size, member.interpolation, encoding), []).append(k)
    items = list(groups.items())
    return items[1:] + items[:1]


def _calibrated(logits: Tensor, seen: Tensor, rows: list[int], temperature: float) -> dict[int, float]:
    """P(PNEUMONIA) = sigmoid(mean member logit / T) of the ``rows`` that every member has scored."""
    rows = [i for i in rows if bool(seen[i].all())]
    if not rows:
        return {}
    probs = calibrated_probabilities(logits[rows], temperature)
    return dict(zip(rows, probs.tolist(), strict=True))


def calibrated_probabilities(logits: Tensor, temperature: float) -> Tensor:
    """Member logits (B, members) -> P(PNEUMONIA) (B,): sigmoid of their mean over T."""
    return apply_temperature(logits.mean(dim=1), temperature)


def predict_files(
    model: LoadedModel | Predictor,
    paths: Sequence[str | os.PathLike[str]],
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device | None = "auto",
    threshold: float | None = None,
    tta: bool | None = None,
    progress: bool = False,
    gradcam_dir: str | os.PathLike[str] | None = None,
    ood: bool = True,
    limits: WarningLimits = WarningLimits(),
    match_encoding: bool = True,
) -> list[PredictionRow]:
    """One row per path, in order. ``threshold``/``tta`` default to the checkpoint's; ``gradcam_dir``
    gets the first member's overlays; ``match_encoding=False`` leaves inputs in their own encoding."""
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    predictor = Predictor.from_model(model) if isinstance(model, LoadedModel) else model
    threshold = predictor.threshold if threshold is None else float(threshold)
    target = resolve_device(device)
    nets = [member.net.to(target).eval() for member in predictor.members]
    ttas = [member.tta if tta is None else bool(tta) for member in predictor.members]
    stats = predictor.ood_stats if ood else None
    paths = [os.fspath(p) for p in paths]
    logits = torch.zeros(len(paths), len(nets), dtype=torch.float64)
    scores = torch.full((len(paths), len(nets)), math.nan, dtype=torch.float64)
    seen = torch.zeros(len(paths), len(nets), dtype=torch.bool)
    errors: dict[int, str] = {}
    infos: dict[int, ImageInfo] = {}
    heatmaps: dict[int, str] = {}
    cam = GradCam(nets[0], Path(gradcam_dir)) if gradcam_dir is not None else None
    groups = preprocessing_groups(predictor, match_encoding)
    with tqdm(total=len(paths) * len(groups), desc="Predicting", unit="img", disable=not progress) as bar:
        for (size, interpolation, encoding), members in groups:
            dataset = PredictDataset(paths, size, interpolation, encoding)
            for images, index, failed, batch_infos in _loader(dataset, batch_size, num_workers, target):
                for i, reason in failed:
                    errors.setdefault(i, reason)
                infos.update(batch_infos)
                if images is not None:
                    images = images.to(target, non_blocking=True)
                    with torch.inference_mode():
                        for k in members:
                            z, member_scores = member_outputs(
                                nets[k], images, ttas[k], None if stats is None else stats[k]
                            )
                            if member_scores is not None:
                                scores[index, k] = member_scores
                            logits[index, k] = z.double().cpu()
                            seen[index, k] = True
                    if cam is not None and 0 in members:
                        batch = _calibrated(logits, seen, index.tolist(), predictor.temperature)
                        heatmaps.update(cam.write(images, index.tolist(), batch, paths, threshold))
                bar.update(len(index) + len(failed))
    probs = _calibrated(logits, seen, list(range(len(paths))), predictor.temperature)
    ood_scores = combine_scores(list(scores.T)) if stats is not None else None
    rows = []
    for i, path in enumerate(paths):
        prob = probs.get(i)
        score = float(ood_scores[i]) if ood_scores is not None and prob is not None else None
        rows.append(
            prediction_row(
                path,
                prob,
                threshold,
                error=errors.get(i),
                ood_score=score,
                info=infos.get(i),
                ood_threshold=predictor.ood_threshold,
                limits=limits,
                gradcam=heatmaps.get(i),
            )
        )
        if prob is not None:
            rows[-1].logit = float(logits[i].mean())  # what a site profile is applied to
    return rows


def apply_site_to_rows(
    rows: Sequence[PredictionRow], profile: SiteProfile, threshold: float | None = None
) -> list[PredictionRow]:
    """The rows with the site profile's probability and label (``threshold`` overrides the profile's),
    each naming the profile; error rows keep their error."""
    threshold = profile.threshold if threshold is None else float(threshold)
    out = []
    for row in rows:
        if row.logit is None:
            out.append(replace(row, threshold=threshold, site=profile.label))
            continue
        prob = float(apply_site(torch.tensor([row.logit], dtype=torch.float64), profile)[0][0])
        label = CLASSES[int(prob >= threshold)]
        out.append(replace(row, prob_pneumonia=prob, label=label, threshold=threshold, site=profile.label))
    return out


# ---------------------------------------------------------------------------------------------- outputs
def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write_csv(rows: Sequence[PredictionRow], path: str | os.PathLike[str]) -> Path:
    """:data:`CSV_COLUMNS` (+ :data:`SITE_COLUMN` when a site profile was applied); the prediction
    cells are empty on error rows."""
    with_site = any(row.site for row in rows)
    body = (
        [
            row.path,
            _fmt(row.prob_pneumonia, ".8f"),
            row.label or "",
            f"{row.threshold:.8g}",
            _fmt(row.ood_score, ".4f"),
            row.warning,
            row.error or "",
            *([row.site or ""] if with_site else []),
        ]
        for row in rows
    )
    header = (*CSV_COLUMNS, SITE_COLUMN) if with_site else CSV_COLUMNS
    return atomic_write_csv(path, [header, *body])


def label_metrics(rows: Sequence[PredictionRow], threshold: float) -> dict[str, Any] | None:
    """Clinical metrics over the predicted rows whose folder names their class; None when there are none."""
    labeled = [r for r in rows if r.ok and r.true_label is not None]
    if not labeled:
        return None
    probs = torch.tensor([r.prob_pneumonia for r in labeled], dtype=torch.float64)
    labels = torch.tensor([r.true_label for r in labeled], dtype=torch.long)
    metrics = classification_metrics(probs, labels, threshold)
    metrics["n_unlabeled"] = sum(1 for r in rows if r.ok and r.true_label is None)
    metrics["n_failed"] = sum(1 for r in rows if not r.ok)
    return metrics


def _clip(text: str, width: int, keep_end: bool = True) -> str:
    """Shorten to ``width`` characters: paths keep their end (the file name), messages their start."""
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if keep_end else text[: width - 1] + "…"


def format_table(rows: Sequence[PredictionRow], show: int) -> Iterator[str]:
    """The first ``show`` rows as a fixed-width table (the CSV has them all)."""
    yield f"{'path':<52} {'p(PNEU)':>8}  {'label':<9}  {'ood':>6}  error / warning"
    for row in rows[: max(int(show), 0)]:
        prob, ood = _fmt(row.prob_pneumonia, ".4f"), _fmt(row.ood_score, ".2f")
        note = row.error or (f"warning: {row.warning}" if row.warnings else "")
        yield f"{_clip(row.path, 52):<52} {prob:>8}  {row.label or '-':<9}  {ood:>6}  {_clip(note, 80, keep_end=False)}"
    if len(rows) > show:
        yield f"... {len(rows) - max(int(show), 0)} more rows in the CSV"


def _fmt_metric(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


# ------------------------------------------------------------------------------------------ entry point


def _check_settings(cfg: Any) -> None:
    """Reject impossible values before a checkpoint or an image is read."""
    for name, low in (("batch_size", 1), ("num_workers", 0), ("show", 0)):
        value = getattr(cfg, name)
        if not is_int(value) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    threshold = cfg.get("threshold")
    if threshold is not None and (not is_num(threshold) or not 0.0 <= threshold <= 1.0):
        raise ConfigError(f"threshold must be a number in [0, 1] or null (checkpoint's), got {threshold!r}")
    if cfg.get("tta") is not None and not isinstance(cfg.tta, bool):
        raise ConfigError(f"tta must be true, false or null (checkpoint's), got {cfg.tta!r}")
    if not isinstance(cfg.get("ood", True), bool):
        raise ConfigError(f"ood must be true or false, got {cfg.ood!r}")
    if cfg.get("site") is not None and not isinstance(cfg.site, str):
        raise ConfigError(f"site must be the path of a site profile (site.json) or null, got {cfg.site!r}")
    warning_limits(cfg)


def warning_limits(cfg: Any) -> WarningLimits:
    """``warn.min_side`` (int >= 1) and ``warn.max_aspect`` (number >= 1) of the predict config."""
    warn = cfg.get("warn") or {}
    min_side = warn.get("min_side", WarningLimits.min_side)
    max_aspect = warn.get("max_aspect", WarningLimits.max_aspect)
    if not is_int(min_side) or min_side < 1:
        raise ConfigError(f"warn.min_side must be an integer >= 1 (pixels), got {min_side!r}")
    if not is_num(max_aspect) or not max_aspect >= 1:
        raise ConfigError(
            f"warn.max_aspect must be a number >= 1 (long side / short side), got {max_aspect!r}"
        )
    return WarningLimits(int(min_side), float(max_aspect))


def warning_summary(rows: Sequence[PredictionRow]) -> str:
    """``warnings: 3 of 10 predicted files (outside the training distribution 2, ...)`` for the terminal."""
    predicted = [r for r in rows if r.ok]
    flagged = [r for r in predicted if r.warnings]
    counts = [f"{text} {sum(1 for r in flagged if k in r.warnings)}" for k, text in WARNING_KINDS.items()]
    return f"warnings: {len(flagged)} of {len(predicted)} predicted files ({', '.join(counts)})"


def _ckpt_spec(value: Any) -> str | list[str]:
    """``ckpt=`` as Hydra gives it: a string (or a number Hydra parsed), or a list (``ckpt=[a,b]``)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [str(v) for v in value]
    return str(value)


def describe_preprocessing(predictor: Predictor, match_encoding: bool = True) -> str:
    """``image size 160px (bilinear) from 224x224 JPEG q75``; an ensemble lists each distinct one once."""
    sizes = [
        f"{size}px ({interp})"
        + (f" from {e.width}x{e.height} JPEG q{e.quality}" if e is not None and match_encoding else "")
        for size, interp, e in predictor.preprocessing
    ]
    return "image size " + " + ".join(sizes)


def _output_csv(cfg: Any) -> Path:
    if cfg.get("output"):
        return Path(str(cfg.output)).expanduser()
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("output= is required when run_predict is called outside a Hydra run")
    return Path(HydraConfig.get().runtime.output_dir) / "preds.csv"


def run_predict(cfg: Any) -> int:
    """``predict.py``: resolve the checkpoint, collect inputs, predict, write CSV (+ metrics, Grad-CAM)."""
    _check_settings(cfg)
    keep_freed_memory()
    predictor = load_predictor(_ckpt_spec(cfg.ckpt), cfg.log_dir)
    log.info("checkpoint: %s", predictor.source)
    if cfg.get("input") is None:
        default = Path(str(cfg.data.root)).expanduser() / "test"
        if not default.is_dir():
            raise InputError(
                f"no input= given and the default test folder {default} does not exist; "
                "pass input=FILE|DIR|GLOB|LIST.txt"
            )
        input_spec: str = str(default)
    else:
        input_spec = str(cfg.input)
    paths = collect_inputs(input_spec)
    device = resolve_device(cfg.device)
    csv_path = _output_csv(cfg)
    threshold = predictor.threshold if cfg.get("threshold") is None else float(cfg.threshold)
    source = predictor.threshold_source if cfg.get("threshold") is None else "threshold="
    calibration = "" if predictor.temperature == 1.0 else f"; temperature {predictor.temperature:.4f}"
    match = bool(cfg.get("match_encoding", True))
    profile = load_site_profile(cfg.site) if cfg.get("site") else None
    if profile is not None:
        check_site_profile(profile, predictor, tta=cfg.get("tta"), match_encoding=match)
        log.info("site profile: %s", profile.summary())
        if cfg.get("threshold") is None:
            threshold, source = profile.threshold, f"site profile {profile.label}"
        calibration = f"; site profile temperature {profile.temperature:.4f}, offset {profile.offset:+.3f}"
    log.info(
        "input: %s (%d files); %s; device %s; threshold %.4f (from %s)%s",
        input_spec,
        len(paths),
        describe_preprocessing(predictor, match),
        device,
        threshold,
        source,
        calibration,
    )
    use_ood, stats = bool(cfg.get("ood", True)), predictor.ood_stats
    if use_ood and stats is None:
        log.info(
            "ood_score: the checkpoint has no OOD statistics (older checkpoint); fit them with "
            "`python -m xray.ood ckpt=... data.root=...`; size, aspect and frame warnings still apply"
        )
    elif use_ood and stats:
        log.info(
            "ood_score: flagged above %.2f (accepts %.0f%% of validation films per member)",
            predictor.ood_threshold,
            100 * stats[0].acceptance,
        )
    rows = predict_files(
        predictor,
        paths,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=device,
        threshold=threshold if profile is None else None,  # a profile relabels the rows below
        tta=cfg.get("tta"),
        progress=True,
        gradcam_dir=csv_path.parent / "gradcam" if cfg.get("gradcam") else None,
        ood=use_ood,
        limits=warning_limits(cfg),
        match_encoding=match,
    )
    if profile is not None:
        rows = apply_site_to_rows(rows, profile, threshold)
    write_csv(rows, csv_path)
    n_failed = sum(1 for r in rows if not r.ok)
    for line in format_table(rows, cfg.show):
        print(line)  # the table is the command's output (stdout); the status lines are logged
    log.info("predicted %d, failed %d (of %d files)", len(rows) - n_failed, n_failed, len(rows))
    log.info("%s", warning_summary(rows))
    log.info("predictions: %s%s", csv_path, f" (site profile {profile.label})" if profile else "")
    metrics = label_metrics(rows, threshold)
    if metrics is not None:
        metrics_path = write_metrics_json(
            csv_path.parent / "metrics.json",
            {
                "checkpoint": predictor.source,
                "input": input_spec,
                **metrics,
                **({"site": {"profile": str(profile.path), "label": profile.label}} if profile else {}),
            },
        )
        names = ("accuracy", "sensitivity", "specificity", "AUROC")
        scores = ", ".join(f"{name} {_fmt_metric(metrics[name.lower()])}" for name in names)
        log.info(
            f"metrics on {metrics['n']} files labelled by their NORMAL/PNEUMONIA folder: {scores} -> {metrics_path}"
        )
    if cfg.get("gradcam"):
        log.info("grad-cam overlays: %s", csv_path.parent / "gradcam")
    if n_failed:
        log.warning(
            "%d of %d files could not be read; see the error column of %s", n_failed, len(rows), csv_path
        )
        return EXIT_SOME_FAILED
    return EXIT_OK
