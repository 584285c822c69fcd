"""What ``serve.py`` runs: the settings checked, the model loaded once to fail early and to say what is
served, then a ``LitServer`` with the page at ``GET /``, ``POST /predict``, ``GET /health`` and
``GET /info`` (LitServe's own), and the upload limits in front of ``/predict``."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import litserve as ls
import python_multipart  # noqa: F401  # Starlette parses multipart with it: missing, fail at start
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute

from xray.core.config_checks import is_int, is_num, require
from xray.inference.predict import describe_preprocessing, resolve_device, warning_limits
from xray.inference.predictor import Predictor, load_predictor
from xray.serving.api import API_KEY_HEADER, API_PATH, PRECISION, FilmAPI, ModelSettings
from xray.serving.uploads import FilmUploads

log = logging.getLogger(__name__)

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServer.run binds to
ACCELERATORS = ("auto", "cpu", "cuda", "mps")
AUTO_BATCH = {"cpu": 4, "accelerator": 32}
"""``max_batch_size=auto``. On a CPU a film costs the same at batch 1 to 4 and two to three times more at
8 to 16 (the activations leave the cache; docs/serving.md); a GPU's cost per batch hardly grows with it."""


def page_html() -> str:
    """The page (package data): one file, its style and script inline, nothing fetched from elsewhere."""
    return resources.files("xray.serving").joinpath("page.html").read_text(encoding="utf-8")


def content_security_policy(html: str) -> str:
    """Only this page's own script (by hash), inline style, its images and calls to this server."""
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts
    )
    return (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _serve_page(app: FastAPI) -> None:
    """``GET /``: the page, in place of LitServe's ``litserve running`` text. It holds no data, so it
    needs no API key (the page asks for one when ``/predict`` does)."""
    html = page_html()
    headers = {"Content-Security-Policy": content_security_policy(html), "Cache-Control": "no-cache"}

    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    app.router.routes[:] = [r for r in app.router.routes if not (isinstance(r, APIRoute) and r.path == "/")]
    app.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)


def build_server(
    api: FilmAPI,
    max_upload_mb: float = 50,
    accelerator: str = "auto",
    devices: int | str = "auto",
    workers_per_device: int = 1,
    timeout: float = 30,
    model_info: dict[str, Any] | None = None,
) -> ls.LitServer:
    """The LitServer of ``api``: dynamic batching (the API's ``max_batch_size``, ``batch_timeout``),
    ``workers_per_device`` worker processes per device, ``timeout`` s in the queue at most (then 504)."""
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers_per_device,
        timeout=timeout,
        model_metadata=model_info,
        middlewares=[(FilmUploads, {"api_path": API_PATH, "max_bytes": int(max_upload_mb * 2**20)})],
        disable_openapi_url=True,
    )
    _serve_page(server.app)
    return server


def _ckpt(value: Any) -> str | tuple[str, ...]:
    """``ckpt=`` as Hydra gives it: a string (or a number Hydra parsed), or a list (an ensemble)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(str(v) for v in value)
    return str(value)


def model_settings(cfg: Any) -> ModelSettings:
    """``ckpt``, ``threshold``, ``tta``, ``ood``, ``match_encoding``, ``warn``: as in predict.py."""
    threshold, tta = cfg.get("threshold"), cfg.get("tta")
    require(
        threshold is None or (is_num(threshold) and 0.0 <= threshold <= 1.0),
        "threshold",
        "a number in [0, 1] or null (checkpoint's)",
        threshold,
    )
    require(tta is None or isinstance(tta, bool), "tta", "true, false or null (checkpoint's)", tta)
    for key in ("ood", "match_encoding"):
        require(isinstance(cfg.get(key, True), bool), key, "true or false", cfg.get(key))
    site = cfg.get("site")
    require(
        site is None or isinstance(site, str), "site", "the path of a site profile (site.json) or null", site
    )
    return ModelSettings(
        ckpt=_ckpt(cfg.ckpt),
        log_dir=str(cfg.get("log_dir", "logs")),
        threshold=None if threshold is None else float(threshold),
        tta=tta,
        ood=bool(cfg.get("ood", True)),
        match_encoding=bool(cfg.get("match_encoding", True)),
        limits=warning_limits(cfg),
        site=cfg.get("site"),
    )


def check_server_settings(cfg: Any) -> None:
    """Reject impossible server settings before the model is loaded, naming the key."""
    host, port = cfg.host, cfg.port
    require(host in HOSTS, "host", f"one of {', '.join(HOSTS)} (127.0.0.1: this machine only)", host)
    require(is_int(port) and 1024 <= port <= 65535, "port", "an integer from 1024 to 65535", port)
    require(
        cfg.max_batch_size == "auto" or (is_int(cfg.max_batch_size) and cfg.max_batch_size >= 1),
        "max_batch_size",
        "auto or an integer >= 1",
        cfg.max_batch_size,
    )
    require(
        is_num(cfg.batch_timeout) and cfg.batch_timeout >= 0,
        "batch_timeout",
        "seconds >= 0",
        cfg.batch_timeout,
    )
    require(
        is_int(cfg.workers_per_device) and cfg.workers_per_device >= 1,
        "workers_per_device",
        "an integer >= 1",
        cfg.workers_per_device,
    )
    require(is_num(cfg.timeout) and cfg.timeout > 0, "timeout", "seconds > 0", cfg.timeout)
    require(
        is_num(cfg.max_upload_mb) and cfg.max_upload_mb > 0,
        "max_upload_mb",
        "megabytes > 0",
        cfg.max_upload_mb,
    )
    require(
        cfg.accelerator in ACCELERATORS, "accelerator", f"one of {', '.join(ACCELERATORS)}", cfg.accelerator
    )
    devices = cfg.devices
    require(
        devices == "auto" or (is_int(devices) and devices >= 1), "devices", "auto or an integer >= 1", devices
    )
    key = cfg.get("api_key")
    require(
        key is None or (isinstance(key, (str, int)) and str(key) != ""),
        "api_key",
        "null or a non-empty string",
        "***",
    )


def batch_size(value: int | str, accelerator: str) -> int:
    """``max_batch_size``, with ``auto`` resolved for the device the workers will use."""
    if value != "auto":
        return int(value)
    device = resolve_device("auto" if accelerator == "auto" else accelerator).type
    return AUTO_BATCH["cpu" if device == "cpu" else "accelerator"]


def model_info(predictor: Predictor, settings: ModelSettings) -> dict[str, Any]:
    """What ``GET /info`` says is served (and the startup line logs); a bad ``site=`` profile, or one
    of another model, stops here."""
    profile = settings.site_profile(predictor)
    if settings.threshold is not None:
        threshold, source = settings.threshold, "threshold="
    elif profile is not None:
        threshold, source = profile.threshold, f"site profile {profile.label}"
    else:
        threshold, source = predictor.threshold, predictor.threshold_source
    return {
        "model": predictor.source,
        "preprocessing": describe_preprocessing(predictor, settings.match_encoding),
        "threshold": threshold,
        "threshold_source": source,
        "site": None if profile is None else profile.summary(),
        "ood": settings.ood and predictor.ood_stats is not None,
        "precision": PRECISION,
    }


def _devices(server: ls.LitServer) -> str:
    flat = [d for entry in server.devices for d in ([entry] if isinstance(entry, str) else entry)]
    return ", ".join(flat)


def run_serve(cfg: Any) -> int:
    """``serve.py``: check the settings, load the model once (a bad ``ckpt=`` stops here with exit 2),
    log what is served and where, then serve until Ctrl-C."""
    check_server_settings(cfg)
    settings = model_settings(cfg)
    predictor = load_predictor(settings.ckpt_spec, settings.log_dir)
    info = model_info(predictor, settings)
    del predictor  # each worker loads its own copy on its device
    api_key = None if cfg.get("api_key") is None else str(cfg.api_key)
    max_batch = batch_size(cfg.max_batch_size, str(cfg.accelerator))
    api = FilmAPI(
        settings,
        api_key=api_key,
        max_batch_size=max_batch,
        batch_timeout=float(cfg.batch_timeout),
        workers_per_device=int(cfg.workers_per_device),
    )
    server = build_server(
        api,
        max_upload_mb=float(cfg.max_upload_mb),
        accelerator=str(cfg.accelerator),
        devices=cfg.devices,
        workers_per_device=int(cfg.workers_per_device),
        timeout=float(cfg.timeout),
        model_info=info,
    )
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    log.info(
        "serving %s (%s; threshold %.4f from %s%s) on %s, precision %s; batches of up to %d requests, "
        "waiting up to %g s for one to fill; %d worker(s) per device; uploads up to %g MB; API key %s; "
        "http://%s:%d/ (page), POST %s, GET /health",
        info["model"],
        info["preprocessing"],
        info["threshold"],
        info["threshold_source"],
        "" if info["site"] is None else f"; site profile {info['site']}",
        _devices(server),
        PRECISION,
        max_batch,
        cfg.batch_timeout,
        cfg.workers_per_device,
        cfg.max_upload_mb,
        f"required ({API_KEY_HEADER} header)" if api_key else "not required",
        host,
        cfg.port,
        API_PATH,
    )
    server.run(host=cfg.host, port=cfg.port, generate_client_file=False, log_level="info")
    return 0
