"""Site profiles (``site.json``): a model's calibration and operating point refitted on one hospital's
films (``python -m xray.site``), applied by ``predict.py site=``, ``python -m xray.export site=`` and
anything else that has the model's raw logits (:func:`apply_site`, one small function).

A profile belongs to one model: its fingerprint is a sha256 over what makes the raw logit, each
member's weights, preprocessing and flip TTA, in member order. Not the stored threshold, temperature
or OOD statistics: they sit after the logit (the profile replaces the first two), so refitting them
(``python -m xray.ood write=true``, a new ``ensemble.json``) keeps a profile valid, while retrained or
re-quantised weights, another input size or another encoding step refuse it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xray.core.atomic import atomic_write_text
from xray.core.config_checks import is_num
from xray.core.errors import UserError
from xray.evaluation.site import KERMANY_PREVALENCE, ModelReference, SiteFit, rule_of
from xray.inference.predictor import MANIFEST_NAME, Predictor

PROFILE_FORMAT = 1
PROFILE_KIND = "xray-site-profile"
SHORT = 12  # hex digits of the fingerprint shown beside a profile's name
FORMULA = (
    "prob_pneumonia = sigmoid(logit / temperature + offset), PNEUMONIA when prob_pneumonia >= threshold; "
    "logit = the mean of the members' raw logits (each with flip TTA as it was evaluated)"
)


class SiteProfileError(UserError, ValueError):
    """A site profile that cannot be used: missing, unreadable, another format, or another model's."""


# ---------------------------------------------------------------------------------------- fingerprint
def model_fingerprint(predictor: Predictor) -> str:
    """sha256 (hex) over each member's weights (names, dtypes, shapes, bytes), preprocessing and TTA."""
    digest = hashlib.sha256(f"{PROFILE_KIND} fingerprint 1\n".encode())
    for member in predictor.members:
        encoding = member.source_encoding
        head = {
            "image_size": member.image_size,
            "interpolation": member.interpolation,
            "source_encoding": None if encoding is None else encoding.to_meta(),
            "tta": member.tta,
        }
        digest.update(json.dumps(head, sort_keys=True).encode())
        for name, tensor in sorted(member.net.state_dict().items()):
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_record(predictor: Predictor, match_encoding: bool = True) -> dict[str, Any]:
    """What a profile records of the model it was fitted for (the fingerprint and the values it replaces)."""
    return {
        "fingerprint": model_fingerprint(predictor),
        "source": predictor.source,
        "members": len(predictor.members),
        "temperature": float(predictor.temperature),
        "threshold": float(predictor.threshold),
        "threshold_rule": threshold_rule(predictor),
        "tta": [bool(m.tta) for m in predictor.members],
        "match_encoding": bool(match_encoding),
    }


def threshold_rule(predictor: Predictor) -> str:
    """The rule that chose the stored threshold (the first member's ``threshold_rule``; youden if none)."""
    return str(predictor.members[0].meta.get("threshold_rule") or "youden")


def reference_for(predictor: Predictor, reference_prevalence: float | None = None) -> ModelReference:
    """The model as shipped, for fitting: its temperature, threshold and rule, the prevalence its
    temperature was fitted at (the Kermany training split's unless given), and its validation's score
    distribution (``ensemble.json``'s ``reference_scores``; None for a single checkpoint or an older
    manifest, so unlabelled films then do not move the prevalence)."""
    threshold = min(max(float(predictor.threshold), 1e-6), 1 - 1e-6)
    return ModelReference(
        temperature=float(predictor.temperature),
        threshold=threshold,
        reference_prevalence=KERMANY_PREVALENCE
        if reference_prevalence is None
        else float(reference_prevalence),
        rule=rule_of(threshold_rule(predictor)),
        reference_scores=predictor.reference_scores,
    )


def model_validation(predictor: Predictor) -> dict[str, Any] | None:
    """The model's own validation figures, for the report: ``out_of_fold`` of an ``ensemble.json``, else
    the ``val`` section of a training run's ``metrics.json`` beside its checkpoint; None if neither."""
    first = predictor.members[0].path
    if predictor.threshold_source == MANIFEST_NAME:
        manifest = _read_json(first.parent / MANIFEST_NAME)
        oof = (manifest or {}).get("out_of_fold")
        if isinstance(oof, dict):
            n = manifest.get("n_out_of_fold") if manifest else None
            return {
                **{k: oof.get(k) for k in ("auroc", "accuracy", "sensitivity", "specificity")},
                "ci": {},
                "source": f"out-of-fold{f', {n} films' if n else ''}",
            }
    if len(predictor.members) == 1:
        for folder in (first.parent, first.parent.parent):
            metrics = _read_json(folder / "metrics.json")
            val = (metrics or {}).get("val")
            if isinstance(val, dict) and isinstance(val.get("at_threshold"), dict):
                point = val["at_threshold"]
                return {
                    **{k: point.get(k) for k in ("auroc", "accuracy", "sensitivity", "specificity")},
                    "ci": val.get("ci") or {},
                    "source": f"validation, {point.get('n', '?')} films",
                }
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -------------------------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class SiteProfile:
    """A loaded ``site.json``: the three numbers applied to raw logits, the model's fingerprint, and
    everything else the file holds (``data``: intervals, films, site metrics, verdict)."""

    temperature: float
    offset: float
    threshold: float
    fingerprint: str
    data: dict[str, Any]
    path: Path | None = None

    @property
    def short(self) -> str:
        return self.fingerprint[:SHORT]

    @property
    def label(self) -> str:
        """``site.json (model 3f2a9c1e0b7d)``: what the CSV's ``site`` column and the terminal show."""
        name = self.path.name if self.path is not None else "site profile"
        return f"{name} (model {self.short})"

    @property
    def prevalence(self) -> float | None:
        value = ((self.data.get("fitted") or {}).get("prevalence") or {}).get("value")
        return float(value) if is_num(value) else None

    def probs(self, logits: Tensor) -> Tensor:
        """The site's P(PNEUMONIA) of raw logits (float64)."""
        return torch.sigmoid(logits.double() / self.temperature + self.offset)

    def summary(self) -> str:
        """One line for a terminal: where it was fitted, the numbers it applies."""
        films = self.data.get("films") or {}
        created = str(self.data.get("created", "?"))[:10]
        prevalence = self.prevalence
        return (
            f"{self.label}, fitted {created} on {films.get('n', '?')} films "
            f"({films.get('n_normal', 0)} NORMAL, {films.get('n_pneumonia', 0)} PNEUMONIA, "
            f"{films.get('n_unlabelled', 0)} unlabelled): temperature {self.temperature:.4f}, offset "
            f"{self.offset:+.3f}, threshold {self.threshold:.4f}"
            + (f", prevalence {prevalence:.3f}" if prevalence is not None else "")
        )

    @classmethod
    def from_json(cls, data: Any, where: str = "site profile", path: Path | None = None) -> SiteProfile:
        """Checked: kind, format, the model's fingerprint and the ``apply`` numbers."""
        if not isinstance(data, dict) or data.get("kind") != PROFILE_KIND:
            raise SiteProfileError(f'{where}: not a site profile (no "kind": "{PROFILE_KIND}")')
        if data.get("format") != PROFILE_FORMAT:
            raise SiteProfileError(
                f"{where}: site profile format {data.get('format')!r}, this version reads format "
                f"{PROFILE_FORMAT}; refit it with python -m xray.site"
            )
        fingerprint = (data.get("model") or {}).get("fingerprint")
        if not isinstance(fingerprint, str) or len(fingerprint) != 64:
            raise SiteProfileError(f"{where}: model.fingerprint must be a sha256 hex string")
        apply = data.get("apply")
        if not isinstance(apply, dict):
            raise SiteProfileError(f'{where}: no "apply" section (temperature, offset, threshold)')
        temperature, offset, threshold = (apply.get(k) for k in ("temperature", "offset", "threshold"))
        if not is_num(temperature) or not math.isfinite(temperature) or temperature <= 0:
            raise SiteProfileError(
                f"{where}: apply.temperature must be a finite number > 0, got {temperature!r}"
            )
        if not is_num(offset) or not math.isfinite(offset):
            raise SiteProfileError(f"{where}: apply.offset must be a finite number, got {offset!r}")
        if not is_num(threshold) or not 0.0 <= threshold <= 1.0:
            raise SiteProfileError(f"{where}: apply.threshold must be a number in [0, 1], got {threshold!r}")
        return cls(float(temperature), float(offset), float(threshold), fingerprint, data, path)


def apply_site(logits: Tensor, profile: SiteProfile) -> tuple[Tensor, Tensor]:
    """(P(PNEUMONIA) at the site, PNEUMONIA calls) of raw logits (the members' mean, before any
    temperature): the whole of what a profile does to a prediction."""
    probs = profile.probs(logits)
    return probs, probs >= profile.threshold


def load_site_profile(path: str | os.PathLike[str]) -> SiteProfile:
    """Read and check ``site.json``; clear errors for a missing file, bad JSON or another format."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SiteProfileError(f"site={path}: no such file (fit one with python -m xray.site)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise SiteProfileError(f"site={path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise SiteProfileError(f"site={path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    return SiteProfile.from_json(data, f"site={path}", path)


def check_site_profile(
    profile: SiteProfile,
    predictor: Predictor,
    *,
    tta: bool | None = None,
    match_encoding: bool = True,
    fingerprint: str | None = None,
) -> None:
    """Refuse a profile fitted for another model, or a prediction whose logits differ from those it was
    fitted on (a ``tta=`` override, ``match_encoding`` switched)."""
    where = str(profile.path) if profile.path is not None else "the site profile"
    model = profile.data.get("model") or {}
    ours = fingerprint or model_fingerprint(predictor)
    if ours != profile.fingerprint:
        raise SiteProfileError(
            f"{where} was fitted for model {profile.short} ({model.get('source', 'source not recorded')}), "
            f"this is model {ours[:SHORT]} ({predictor.source}); fit a profile for this model with "
            "python -m xray.site"
        )
    if tta is not None and any(bool(m.tta) != bool(tta) for m in predictor.members):
        raise SiteProfileError(
            f"{where} was fitted on the logits of each member's own flip TTA; tta={str(tta).lower()} changes "
            "them: leave tta= unset with site="
        )
    fitted_with = model.get("match_encoding", True)
    if bool(fitted_with) != bool(match_encoding):
        raise SiteProfileError(
            f"{where} was fitted with match_encoding={str(bool(fitted_with)).lower()}; predict with the same "
            "setting (it changes the logits)"
        )


def json_ready(obj: Any) -> Any:
    """Plain JSON: tensors and numpy scalars to numbers, paths to strings, nan and inf to null."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, Tensor):
        return json_ready(obj.item() if obj.numel() == 1 else obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return json_ready(obj.item())
    value = float(obj)
    return value if math.isfinite(value) else None


def profile_data(
    fit: SiteFit,
    model: Mapping[str, Any],
    *,
    intervals: Mapping[str, Sequence[float]] | None = None,
    films: Mapping[str, Any] | None = None,
    prevalence_method: str = "auto",
    threshold_rule: str = "youden",
    alpha: float | None = None,
    site: Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
    verdict: tuple[str, str] | None = None,
    warnings: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """A ``site.json`` (format 1) from a fit and the :func:`model_record` of the model it was fitted for."""
    ci = intervals or {}
    return json_ready(
        {
            "format": PROFILE_FORMAT,
            "kind": PROFILE_KIND,
            "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {**model, "reference_prevalence": fit.reference_prevalence},
            "apply": {
                "temperature": fit.temperature,
                "offset": fit.offset,
                "threshold": fit.threshold,
                "formula": FORMULA,
            },
            "fitted": {
                "temperature": {
                    "value": fit.temperature,
                    "ci": ci.get("temperature"),
                    "changed": fit.calibration_changed,
                },
                "bias": {"value": fit.bias, "ci": ci.get("bias"), "changed": fit.calibration_changed},
                "prevalence": {
                    "value": fit.prevalence,
                    "ci": ci.get("prevalence"),
                    "changed": fit.prevalence_changed,
                    "method": prevalence_method,
                    "reference": fit.reference_prevalence,
                    "unlabelled": fit.unlabelled,
                },
                "threshold": {
                    "value": fit.threshold,
                    "ci": ci.get("threshold"),
                    "rule": threshold_rule,
                    "cut_logit": fit.cut,
                },
                "tests": {
                    "alpha": alpha,
                    "calibration_score": fit.calibration_stat,
                    "prevalence_likelihood_ratio": fit.prevalence_stat,
                    "mixture_g": fit.mixture_stat,
                    "mixture_df": fit.mixture_df,
                },
            },
            "films": dict(films or {}),
            "site": dict(site or {}),
            "validation": None if validation is None else dict(validation),
            "verdict": None if verdict is None else {"kind": verdict[0], "text": verdict[1]},
            "warnings": list(warnings),
            "options": dict(options or {}),
        }
    )


def write_site_profile(path: str | os.PathLike[str], data: Mapping[str, Any]) -> SiteProfile:
    """Check ``data`` as a loader would, then write it atomically (an old file survives a failure)."""
    path = Path(path).expanduser()
    data = json_ready(data)
    profile = SiteProfile.from_json(data, str(path), path)
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    return profile
