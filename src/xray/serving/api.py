"""The inference worker's side of ``POST /predict``: LitServe's decode -> batch -> predict -> unbatch ->
encode, each step one of ``predict.py``'s own (:mod:`xray.inference.predict`), so that an answer holds
the CSV row's fields and values for the same file.

A film that cannot be read is answered with a 4xx carrying its reason; it never raises inside a batch,
where one exception would fail the whole batch.
"""

from __future__ import annotations

import base64
import hmac
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import litserve as ls
import numpy as np
import torch
from fastapi import Depends, HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from matplotlib import colormaps
from PIL import Image
from torch import Tensor

from xray.data.io import ImageInfo, ImageReadError, read_image_bytes
from xray.inference.gradcam import GradCam
from xray.inference.ood import combine_scores
from xray.inference.predict import (
    CSV_COLUMNS,
    SITE_COLUMN,
    PredictionRow,
    WarningLimits,
    apply_site_to_rows,
    calibrated_probabilities,
    describe_preprocessing,
    member_outputs,
    prediction_row,
    prepare_image,
    preprocessing_groups,
    resolve_device,
)
from xray.inference.predictor import Predictor, load_predictor
from xray.inference.site import SiteProfile, check_site_profile, load_site_profile
from xray.serving.uploads import UNRECOGNISED, film_name

API_PATH = "/predict"
API_KEY_HEADER = "X-API-Key"
PRECISION = "fp32"  # as predict.py: no autocast, so the probabilities match it
_KEY = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)


@dataclass(frozen=True)
class ModelSettings:
    """What the worker loads and how it scores: ``predict.py``'s keys of the same names."""

    ckpt: str | tuple[str, ...] = "best"
    log_dir: str = "logs"
    threshold: float | None = None
    tta: bool | None = None
    ood: bool = True
    match_encoding: bool = True
    limits: WarningLimits = WarningLimits()
    site: str | None = None  # a site profile (site.json) applied to every answer

    @property
    def ckpt_spec(self) -> str | list[str]:
        """``ckpt=`` as :func:`load_predictor` takes it (a list is an ensemble of those checkpoints)."""
        return self.ckpt if isinstance(self.ckpt, str) else list(self.ckpt)

    def site_profile(self, predictor: Predictor) -> SiteProfile | None:
        """The ``site=`` profile, checked against this model and these settings (as predict.py does)."""
        if self.site is None:
            return None
        profile = load_site_profile(self.site)
        check_site_profile(profile, predictor, tta=self.tta, match_encoding=self.match_encoding)
        return profile


@dataclass
class Film:
    """One decoded upload: its uint8 (1,S,S) input per preprocessing group, or why it has none."""

    name: str
    inputs: list[Tensor] = field(default_factory=list)
    info: ImageInfo | None = None
    error: str | None = None
    gradcam: bool = False


@dataclass
class Answer:
    """A film's row, the size of the batch that scored it, and with ``gradcam`` its two PNGs."""

    row: PredictionRow
    batch_size: int
    gradcam_png: bytes | None = None
    film_png: bytes | None = None


def status_for(reason: str) -> int:
    """HTTP status of an unreadable film: 415 when it is no supported image at all, 400 when empty,
    422 when it is one that cannot be decoded (truncated, corrupt, a decompression bomb, a bad DICOM)."""
    if reason.startswith(("unsupported file type", "not an image")):
        return 415
    if reason.startswith("empty file"):
        return 400
    return 422


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(film: Tensor, heat: Tensor, alpha: float = 0.4) -> bytes:
    """uint8 (S,S) film and its (S,S) Grad-CAM map in [0, 1] -> the map in jet over the film, as the
    overlays of ``predict.py gradcam=true`` draw it, without the title (the page shows the numbers)."""
    gray = np.repeat(film.cpu().numpy().astype(np.float64)[..., None] / 255.0, 3, axis=-1)
    jet = colormaps["jet"](heat.cpu().numpy())[..., :3]
    return _png(np.rint(255 * ((1 - alpha) * gray + alpha * jet)).clip(0, 255).astype(np.uint8))


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


class FilmScorer:
    """``predict_files``' scoring for films held in memory: each member runs once per batch (with its own
    TTA), then the mean logit over T, the OOD score, the row at the threshold, and its warnings."""

    def __init__(self, predictor: Predictor, settings: ModelSettings, device: str | torch.device = "auto"):
        self.predictor = predictor
        self.settings = settings
        self.device = resolve_device(device)
        self.site = settings.site_profile(predictor)
        threshold = predictor.threshold if self.site is None else self.site.threshold
        self.threshold = threshold if settings.threshold is None else float(settings.threshold)
        self.nets = [member.net.to(self.device).eval() for member in predictor.members]
        self.ttas = [m.tta if settings.tta is None else bool(settings.tta) for m in predictor.members]
        self.stats = predictor.ood_stats if settings.ood else None
        self.groups = preprocessing_groups(predictor, settings.match_encoding)
        self.cam_group = next(g for g, (_, members) in enumerate(self.groups) if 0 in members)
        self.preprocessing = describe_preprocessing(predictor, settings.match_encoding)
        self._cam: GradCam | None = None

    def decode(self, data: bytes, filename: str | None = None, gradcam: bool = False) -> Film:
        """An upload's bytes -> each preprocessing group's input, read as ``predict.py`` reads a file."""
        name = film_name(filename, data)
        if name is None:
            return Film(filename or "upload", error=UNRECOGNISED, gradcam=gradcam)
        try:
            image, info = read_image_bytes(data, name)
            inputs = [
                prepare_image(image, io.BytesIO(data), size, interpolation, encoding)
                for (size, interpolation, encoding), _ in self.groups
            ]
        except ImageReadError as err:
            return Film(name, error=err.reason, gradcam=gradcam)
        except Exception as err:  # one odd upload must not take the other films of its batch down
            return Film(
                name, error=f"cannot read image: {type(err).__name__}: {str(err)[:300]}", gradcam=gradcam
            )
        return Film(name, inputs, info, gradcam=gradcam)

    def score(self, films: Sequence[Film]) -> list[Answer]:
        """One answer per film, in order; the readable ones scored together as one batch per member."""
        good = [f for f in films if f.error is None]
        probs, ood_scores, logits = self._probabilities(good)
        drawn = self._overlays([f for f in good if f.gradcam])
        rows, k = [], 0
        for film in films:
            if film.error is not None:
                rows.append(prediction_row(film.name, None, self.threshold, error=film.error))
                continue
            rows.append(
                prediction_row(
                    film.name,
                    probs[k],
                    self.threshold,
                    ood_score=None if ood_scores is None else ood_scores[k],
                    info=film.info,
                    ood_threshold=self.predictor.ood_threshold,
                    limits=self.settings.limits,
                )
            )
            rows[-1].logit = logits[k]  # what a site profile is applied to
            k += 1
        if self.site is not None:
            rows = apply_site_to_rows(rows, self.site, self.settings.threshold)
        return [
            Answer(row, len(films), *drawn.get(id(film), (None, None)))
            for film, row in zip(films, rows, strict=True)
        ]

    def _probabilities(self, films: list[Film]) -> tuple[list[float], list[float] | None, list[float]]:
        """(P(PNEUMONIA), OOD score or None, mean raw logit) of each film: every member once on the
        stacked batch."""
        if not films:
            return [], None, []
        logits = torch.zeros(len(films), len(self.nets), dtype=torch.float64)
        scores = torch.full((len(films), len(self.nets)), math.nan, dtype=torch.float64)
        with torch.inference_mode():
            for g, (_, members) in enumerate(self.groups):
                images = torch.stack([film.inputs[g] for film in films]).to(self.device, non_blocking=True)
                for k in members:
                    stats = None if self.stats is None else self.stats[k]
                    z, member_scores = member_outputs(self.nets[k], images, self.ttas[k], stats)
                    logits[:, k] = z.double().cpu()
                    if member_scores is not None:
                        scores[:, k] = member_scores
        probs = calibrated_probabilities(logits, self.predictor.temperature).tolist()
        ood = combine_scores(list(scores.T)).tolist() if self.stats is not None else None
        return probs, ood, logits.mean(dim=1).tolist()

    def _overlays(self, films: list[Film]) -> dict[int, tuple[bytes, bytes]]:
        """{id(film): (Grad-CAM overlay PNG, the film as the first member saw it PNG)}: first member, as
        ``predict.py gradcam=true``."""
        if not films:
            return {}
        if self._cam is None:
            self._cam = GradCam(self.nets[0])
        images = torch.stack([film.inputs[self.cam_group] for film in films]).to(self.device)
        heat = self._cam.maps(images)
        return {
            id(film): (overlay_png(image[0], h), _png(image[0].cpu().numpy()))
            for film, image, h in zip(films, images, heat, strict=True)
        }


def answer_json(answer: Answer, model: str, preprocessing: str) -> dict[str, Any]:
    """The CSV row's columns with their values (numbers unrounded), the warnings by kind, which model
    and preprocessing answered, the batch size, and with Grad-CAM the two PNGs in base64."""
    row = answer.row
    body: dict[str, Any] = {column: getattr(row, column) for column in CSV_COLUMNS}
    body["prob_pneumonia"] = _finite(row.prob_pneumonia)
    body["ood_score"] = _finite(row.ood_score)
    if row.site is not None:  # the CSV's column when a site profile was applied
        body[SITE_COLUMN] = row.site
    body.update(
        warnings=dict(row.warnings), model=model, preprocessing=preprocessing, batch_size=answer.batch_size
    )
    if answer.gradcam_png is not None and answer.film_png is not None:
        body["gradcam_png"] = base64.b64encode(answer.gradcam_png).decode("ascii")
        body["film_png"] = base64.b64encode(answer.film_png).decode("ascii")
    return body


class FilmAPI(ls.LitAPI):
    """The LitServe API: batches of uploads across clients, scored by a :class:`FilmScorer`. LitServe's
    own ``batch`` (the list of decoded films) and ``unbatch`` (one answer each) are the ones needed."""

    def __init__(
        self,
        settings: ModelSettings,
        api_key: str | None = None,
        max_batch_size: int = 16,
        batch_timeout: float = 0.05,
        workers_per_device: int = 1,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.settings = settings
        self.api_key = api_key
        self.workers_per_device = workers_per_device
        self.scorer: FilmScorer | None = None

    def setup(self, device: str) -> None:
        """Load the model in the worker process, on the device LitServe gives it."""
        if torch.device(device).type == "cpu" and self.workers_per_device > 1:  # share the cores
            torch.set_num_threads(max(1, torch.get_num_threads() // self.workers_per_device))
        predictor = load_predictor(self.settings.ckpt_spec, self.settings.log_dir)
        self.scorer = FilmScorer(predictor, self.settings, device)

    def authorize(self, x_api_key: str | None = Depends(_KEY)) -> None:
        """LitServe's per-API check, run before the body is read: 401 unless the key matches."""
        if self.api_key is None:
            return
        if x_api_key is None or not hmac.compare_digest(x_api_key.encode(), self.api_key.encode()):
            raise HTTPException(401, f"missing or wrong API key: send it in the {API_KEY_HEADER} header")

    # no annotation on ``request``: LitServe then parses the JSON body (uploads.FilmUploads made it)
    def decode_request(self, request, **kwargs: Any) -> Film:
        return self._scorer.decode(
            base64.b64decode(request["data"]), request.get("name"), bool(request["gradcam"])
        )

    def predict(self, x: Film | list[Film], **kwargs: Any) -> Answer | list[Answer]:
        """A batch of films (``max_batch_size`` > 1), or one film when batching is off."""
        if isinstance(x, Film):
            return self._scorer.score([x])[0]
        return self._scorer.score(x)

    def encode_response(self, output: Answer, **kwargs: Any) -> JSONResponse:
        """200 with the row, or the 4xx of an unreadable film with its reason as ``detail`` too."""
        scorer = self._scorer
        body = answer_json(output, scorer.predictor.source, scorer.preprocessing)
        if output.row.error is None:
            return JSONResponse(body)
        return JSONResponse({"detail": output.row.error, **body}, status_code=status_for(output.row.error))

    @property
    def _scorer(self) -> FilmScorer:
        if self.scorer is None:
            raise RuntimeError("FilmAPI.setup has not run in this process")
        return self.scorer
