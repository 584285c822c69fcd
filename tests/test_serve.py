"""serve.py's server: answers equal predict.py's rows, bad uploads get a 4xx with their reason and
lose nothing else, the API key, bounded memory, nothing on disk, one batch per ensemble member.

Servers run on LitServe's test client (``wrap_litserve_start`` + ``TestClient``: the API side in this
process, a real inference worker process) with tiny synthetic checkpoints; one test starts
``serve.py`` itself on a free loopback port, one (real data) serves the shipped ensemble.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("litserve", reason="the serve extra is not installed: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from litserve.utils import wrap_litserve_start  # noqa: E402

from tests.conftest import PROJECT_ROOT, REAL_DATA, REAL_FULLRES, synthetic_xray  # noqa: E402
from tests.helpers import compose_hydra  # noqa: E402
from tests.odd_files import (  # noqa: E402
    gradient_image,
    jpeg_bytes,
    noise_image,
    write_dicom,
    write_png16,
    write_png_header_only,
)
from tests.test_ensemble import make_net, save_ckpt  # noqa: E402
from xray.core.config_checks import ConfigError  # noqa: E402
from xray.evaluation.site import SiteFit  # noqa: E402
from xray.inference import predict as predict_module  # noqa: E402
from xray.inference.ood import fit_network  # noqa: E402
from xray.inference.predict import CSV_COLUMNS, apply_site_to_rows, predict_files  # noqa: E402
from xray.inference.predictor import load_predictor  # noqa: E402
from xray.inference.site import (  # noqa: E402
    SiteProfileError,
    load_site_profile,
    model_record,
    profile_data,
    write_site_profile,
)
from xray.serving import api as api_module  # noqa: E402
from xray.serving.api import FilmAPI, FilmScorer, ModelSettings, answer_json  # noqa: E402
from xray.serving.server import (  # noqa: E402
    AUTO_BATCH,
    batch_size,
    build_server,
    check_server_settings,
    model_info,
)

LIMIT_MB = 3
KEY = "s3cret-key"


# ---------------------------------------------------------------------------------------------- helpers
def _films(n: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([synthetic_xray(i % 2, size, rng) for i in range(n)])).unsqueeze(1)


def make_ensemble(folder: Path) -> tuple[str, str]:
    """Two members that differ in every way prediction cares about: image size, interpolation, the
    training files' encoding, flip TTA, temperature, threshold; both with OOD statistics."""
    a, b = make_net(64, 1), make_net(48, 2)
    ood_a = fit_network(a, _films(60, 64, 1), _films(40, 64, 2), components=3).to_meta()
    ood_b = fit_network(b, _films(60, 48, 3), _films(40, 48, 4), components=3).to_meta()
    encoding = {"width": 56, "height": 56, "quality": 75}
    first = save_ckpt(
        folder / "a.ckpt",
        a,
        preprocessing={"image_size": 64, "interpolation": "bilinear", "source_encoding": encoding},
        tta=True,
        temperature=1.7,
        threshold=0.4,
        ood=ood_a,
    )
    second = save_ckpt(folder / "b.ckpt", b, "nearest", temperature=1.3, threshold=0.6, ood=ood_b)
    return str(first), str(second)


def make_films(folder: Path) -> dict[str, Path]:
    """Readable films of every kind the reader takes, some that warn (small, long, several frames)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    films = {
        "film.png": synthetic_xray(1, 80, rng),
        "film_q90.jpg": synthetic_xray(0, 96, rng)[:, :90],
        "film_enc.jpg": synthetic_xray(1, 56, rng),  # the training files' encoding: used as read
        "small.png": synthetic_xray(0, 40, rng),
        "strip.png": synthetic_xray(1, 200, rng)[:20],
    }
    paths: dict[str, Path] = {}
    for name, pixels in films.items():
        quality = {"film_q90.jpg": 90, "film_enc.jpg": 75}.get(name)
        path = folder / name
        Image.fromarray(pixels).save(path, quality=quality) if quality else Image.fromarray(pixels).save(path)
        paths[name] = path
    paths["film16.png"] = write_png16(folder / "film16.png", synthetic_xray(0, 72, rng))
    paths["film.dcm"] = write_dicom(folder / "film.dcm", synthetic_xray(1, 72, rng).astype(np.uint16) * 16)
    frames = [Image.fromarray(synthetic_xray(i, 70, rng)) for i in range(2)]
    frames[0].save(folder / "two.gif", save_all=True, append_images=frames[1:])
    paths["two.gif"] = folder / "two.gif"
    return paths


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def post_film(
    client: TestClient,
    name: str,
    data: bytes,
    multipart: bool = True,
    headers: dict[str, str] | None = None,
    **params: str,
) -> Any:
    """A film as a multipart field ``file`` or as the raw body named by ``?filename=``."""
    if multipart:
        files = {"file": (name, data, "application/octet-stream")}
        return client.post("/predict", params=params, files=files, headers=headers)
    return client.post("/predict", params={"filename": name, **params}, content=data, headers=headers)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def running(api: FilmAPI, **options: Any) -> Iterator[tuple[TestClient, Any]]:
    """A LitServer of ``api`` with a real inference worker, behind LitServe's test client."""
    server = build_server(api, **{"max_upload_mb": LIMIT_MB, **options})
    with wrap_litserve_start(server) as started, TestClient(started.app) as client:
        yield client, started


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_ensemble(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_films(tmp_path_factory.mktemp("films"))


@pytest.fixture(scope="module")
def served(ckpts: tuple[str, str]) -> Iterator[tuple[TestClient, Any]]:
    """Batches of up to 4 requests, waiting 0.1 s to fill, so that concurrent clients share one."""
    api = FilmAPI(ModelSettings(ckpt=ckpts), max_batch_size=4, batch_timeout=0.1)
    with running(api, timeout=120) as pair:
        assert pair[0].get("/health").status_code in (200, 503)
        yield pair


@pytest.fixture(scope="module")
def client(served: tuple[TestClient, Any]) -> TestClient:
    return served[0]


# ---------------------------------------------------------------------------------------- same as CSV
def test_answers_are_predict_py_rows_of_the_same_files(
    client: TestClient, ckpts: tuple[str, str], films: dict[str, Path]
) -> None:
    expected = predict_files(load_predictor(list(ckpts)), list(films.values()), batch_size=3, device="cpu")
    for (name, path), row in zip(films.items(), expected, strict=True):
        response = post_film(client, name, path.read_bytes(), multipart=name.endswith(("png", "dcm")))
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(CSV_COLUMNS) <= set(body), "every column of the CSV row"
        assert body["path"] == name
        assert abs(body["prob_pneumonia"] - row.prob_pneumonia) <= 1e-6, name
        assert body["ood_score"] == pytest.approx(row.ood_score, rel=1e-5), name  # float32 features
        assert (body["label"], body["threshold"], body["warning"], body["error"]) == (
            row.label,
            row.threshold,
            row.warning,
            None,
        ), name
        assert body["warnings"] == row.warnings
        assert "ensemble of 2" in body["model"] and body["preprocessing"].startswith(
            "image size 64px (bilinear)"
        )
    kinds = {k for row in expected for k in row.warnings}
    assert {"small", "aspect", "frames"} <= kinds, "the films exercise the warnings"


def test_a_raw_body_without_a_name_is_recognised_by_its_content(
    client: TestClient, films: dict[str, Path]
) -> None:
    for name in ("film.png", "film_q90.jpg", "film.dcm", "two.gif"):
        response = client.post("/predict", content=films[name].read_bytes())
        assert response.status_code == 200, (name, response.text)
        assert response.json()["path"] == "upload" + Path(name).suffix
    curl_default = {"Content-Type": "application/x-www-form-urlencoded"}  # curl --data-binary @film.jpg
    response = client.post("/predict", content=films["film_q90.jpg"].read_bytes(), headers=curl_default)
    assert response.status_code == 200


def test_gradcam_adds_the_overlay_and_the_film_as_pngs(client: TestClient, films: dict[str, Path]) -> None:
    plain = post_film(client, "film.png", films["film.png"].read_bytes()).json()
    assert "gradcam_png" not in plain
    body = post_film(client, "film.png", films["film.png"].read_bytes(), gradcam="true").json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["gradcam_png"])))
    film = Image.open(io.BytesIO(base64.b64decode(body["film_png"])))
    assert (overlay.format, overlay.mode, overlay.size) == (
        "PNG",
        "RGB",
        (64, 64),
    )  # the first member's input
    assert (film.mode, film.size) == ("L", (64, 64))
    assert abs(body["prob_pneumonia"] - plain["prob_pneumonia"]) <= 1e-6


# ------------------------------------------------------------------------------------------- bad input
def _truncated_dicom(folder: Path) -> bytes:
    data = write_dicom(folder / "whole.dcm", gradient_image().astype(np.uint16) * 16).read_bytes()
    return data[: len(data) // 2]


def _bad_uploads(folder: Path) -> dict[str, tuple[str | None, bytes, int, str]]:
    """{case: (file name or None for a nameless raw body, bytes, status, a substring of the reason)}."""
    folder.mkdir(parents=True, exist_ok=True)
    html = b"<!doctype html><html><head><title>Saved page</title></head><body>not a film</body></html>\n" * 20
    jpeg = jpeg_bytes(noise_image(64, 64))
    no_pixels = write_dicom(folder / "no_pixels.dcm", np.zeros((8, 8), np.uint16), with_pixels=False)
    return {
        "empty body": (None, b"", 400, "empty upload"),
        "HTML saved as .jpg": ("scan.jpg", html, 415, "not an image (cannot identify image file)"),
        "HTML without a name": (None, html, 415, "unsupported file type"),
        "truncated JPEG": ("film.jpg", jpeg[: len(jpeg) // 2], 422, "truncated or corrupt JPEG"),
        "decompression bomb": (
            "bomb.png",
            write_png_header_only(folder / "b.png").read_bytes(),
            422,
            "decompression bomb",
        ),
        "over the upload limit": (
            "big.png",
            b"\x89PNG\r\n\x1a\n" + bytes(LIMIT_MB * 2**20 + 1),
            413,
            "upload too large",
        ),
        "unsupported type": ("notes.xyz", png_bytes(gradient_image()), 415, "unsupported file type '.xyz'"),
        "DICOM without pixels": ("study.dcm", no_pixels.read_bytes(), 422, "DICOM file has no pixel data"),
        "truncated DICOM": ("cut.dcm", _truncated_dicom(folder), 422, "DICOM"),
    }


BAD_CASES = [
    "empty body",
    "HTML saved as .jpg",
    "HTML without a name",
    "truncated JPEG",
    "decompression bomb",
    "over the upload limit",
    "unsupported type",
    "DICOM without pixels",
    "truncated DICOM",
]


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "raw"])
def test_each_bad_upload_gets_its_4xx_and_reason_and_the_next_film_is_answered(
    client: TestClient, films: dict[str, Path], tmp_path: Path, case: str, multipart: bool
) -> None:
    name, data, status, reason = _bad_uploads(tmp_path)[case]
    if name is None and multipart:
        name = "upload"  # a multipart part always has a name; an empty one is still empty
    if name is None:
        response = client.post("/predict", content=data)
    else:
        response = post_film(client, name, data, multipart=multipart)
    assert response.status_code == status, response.text
    assert reason in response.json()["detail"]
    if status in (415, 422):  # the film was read: its row says why, as the CSV's error column would
        body = response.json()
        assert body["error"] == body["detail"] and body["prob_pneumonia"] is None and body["label"] is None
    good = post_film(client, "film.png", films["film.png"].read_bytes())
    assert good.status_code == 200 and good.json()["label"] in ("NORMAL", "PNEUMONIA")


@pytest.mark.parametrize(
    ("request_args", "reason"),
    [
        ({"files": [("file", ("a.png", b"1")), ("file", ("b.png", b"2"))]}, "bad multipart upload"),
        ({"files": {}, "data": {"note": "no file"}}, "holds no file"),
        ({"content": b"x", "params": {"gradcam": "maybe"}}, "gradcam must be true or false"),
    ],
    ids=["two files", "no file part", "bad gradcam"],
)
def test_malformed_requests_get_400(client: TestClient, request_args: dict[str, Any], reason: str) -> None:
    args = dict(request_args)
    if args.get("files") == {}:  # a multipart body with a text field only
        args.pop("files")
        response = client.post(
            "/predict",
            content=b'--xx\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file\r\n--xx--\r\n',
            headers={"Content-Type": "multipart/form-data; boundary=xx"},
        )
    else:
        response = client.post("/predict", **args)
    assert response.status_code == 400, response.text
    assert reason in response.json()["detail"]


def test_a_bad_film_fails_alone_inside_a_batch_of_concurrent_clients(
    client: TestClient, films: dict[str, Path], tmp_path: Path
) -> None:
    good = films["film.png"].read_bytes()
    solo = post_film(client, "film.png", good).json()["prob_pneumonia"]
    uploads = [("film.png", good)] * 3 + [("film.jpg", _bad_uploads(tmp_path)["truncated JPEG"][1])]
    with ThreadPoolExecutor(len(uploads)) as pool:
        responses = list(pool.map(lambda u: post_film(client, *u), uploads))
    assert [r.status_code for r in responses] == [200, 200, 200, 422]
    assert all(abs(r.json()["prob_pneumonia"] - solo) <= 1e-6 for r in responses[:3])
    assert max(r.json()["batch_size"] for r in responses) > 1, "concurrent clients were batched together"


def test_memory_stays_bounded_under_repeated_bad_uploads(
    served: tuple[TestClient, Any], films: dict[str, Path], tmp_path: Path
) -> None:
    client, server = served
    worker = server.inference_workers[0].pid
    bad = _bad_uploads(tmp_path)
    cases = [bad[c] for c in BAD_CASES if c not in ("empty body",)]

    def hammer(n: int) -> None:
        for i in range(n):
            name, data, status, _ = cases[i % len(cases)]
            response = post_film(client, name or "upload", data)
            assert response.status_code == status

    hammer(20)  # warm up: allocator pools, the first decodes
    before = (rss_mb(worker), rss_mb(os.getpid()))
    hammer(200)
    after = (rss_mb(worker), rss_mb(os.getpid()))
    growth = [a - b for a, b in zip(after, before, strict=True)]
    assert growth[0] < 40 and growth[1] < 40, f"RSS growth over 200 bad uploads (worker, API), MB: {growth}"
    assert post_film(client, "film.png", films["film.png"].read_bytes()).status_code == 200


# ---------------------------------------------------------------------------------------- ensemble, key
def test_an_ensemble_runs_one_batch_per_member(
    ckpts: tuple[str, str], films: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = predict_module.member_outputs

    def counted(net: Any, images: torch.Tensor, tta: bool, stats: Any) -> Any:
        calls.append((id(net), len(images)))
        return real(net, images, tta, stats)

    monkeypatch.setattr(api_module, "member_outputs", counted)
    scorer = FilmScorer(load_predictor(list(ckpts)), ModelSettings(ckpt=ckpts), "cpu")
    batch = [scorer.decode(p.read_bytes(), name) for name, p in films.items()]
    batch.append(scorer.decode(b"not a film", "x.jpg"))
    answers = scorer.score(batch)
    assert len(calls) == 2 and {n for _, n in calls} == {len(films)}, calls
    assert len({net for net, _ in calls}) == 2
    assert [a.row.ok for a in answers] == [True] * len(films) + [False]


@pytest.fixture(scope="module")
def keyed(ckpts: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with an API key whose worker was started in an empty working and temporary folder (this
    process keeps the temporary one too: Starlette would spool an upload there)."""
    work, tmp = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("tmp")
    saved = os.getcwd(), os.environ.get("TMPDIR"), tempfile.tempdir
    os.chdir(work)
    os.environ["TMPDIR"], tempfile.tempdir = str(tmp), str(tmp)
    try:
        api = FilmAPI(ModelSettings(ckpt=ckpts), api_key=KEY, max_batch_size=2, batch_timeout=0.01)
        with running(api, timeout=120) as (client, _):
            os.chdir(saved[0])  # the worker has started in ``work``; the other tests run where they were
            yield {"client": client, "folders": (work, tmp)}
    finally:
        os.chdir(saved[0])
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        tempfile.tempdir = saved[2]


def test_with_an_api_key_a_missing_or_wrong_key_gets_401(
    keyed: dict[str, Any], films: dict[str, Path]
) -> None:
    client, data = keyed["client"], films["film.png"].read_bytes()
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
        response = client.post("/predict", content=data, headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["detail"], headers
    over_limit = client.post("/predict", content=bytes(LIMIT_MB * 2**20 + 10))
    assert over_limit.status_code == 401, "the key is checked before the body is read"
    assert client.post("/predict", content=data, headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/health").status_code == 401
    assert client.get("/health", headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/").status_code == 200, "the page holds no data; it asks for the key itself"


def test_nothing_uploaded_is_written_to_disk(keyed: dict[str, Any]) -> None:
    """The worker's working and temporary folders (and this process's, where Starlette would spool a
    multipart file) gain nothing from uploads; multiprocessing's own sockets were there before."""
    client, folders = keyed["client"], keyed["folders"]
    before = [sorted(folder.rglob("*")) for folder in folders]
    large = png_bytes(noise_image(1100, 1100))  # over Starlette's 1 MB spooling size, under the limit
    assert 2**20 < len(large) < LIMIT_MB * 2**20
    headers = {"X-API-Key": KEY}
    for multipart in (True, False):
        response = post_film(client, "big.png", large, multipart, headers, gradcam="true")
        assert response.status_code == 200, response.text
    response = client.post("/predict", files={"file": ("x.jpg", b"<html></html>")}, headers=headers)
    assert response.status_code == 415
    assert [sorted(folder.rglob("*")) for folder in folders] == before


# ------------------------------------------------------------------------------------------ page, config
def test_the_page_is_one_self_contained_file(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "nothing fetched from elsewhere"
    assert "@import" not in html and "research use, not a medical device" in html.lower()
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert client.get("/health").text == "ok"
    assert client.get("/info").json()["server"]["devices"] == ["cpu"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("host=localhost", "host"),
        ("port=80", "port"),
        ("max_batch_size=0", "max_batch_size"),
        ("batch_timeout=-1", "batch_timeout"),
        ("workers_per_device=0", "workers_per_device"),
        ("max_upload_mb=0", "max_upload_mb"),
        ("accelerator=tpu", "accelerator"),
        ("api_key=''", "api_key"),
    ],
)
def test_bad_server_settings_are_refused_naming_the_key(override: str, key: str, tmp_path: Path) -> None:
    cfg = compose_hydra("serve", tmp_path, [override])
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_server_settings(cfg)


def _site_profile(folder: Path, ckpts: tuple[str, str]) -> Path:
    """A site profile of the test ensemble: temperature 2, offset -0.5, threshold 0.3."""
    fit = SiteFit(
        temperature=2.0,
        bias=-0.2,
        prevalence=0.4,
        cut=0.1,
        threshold=0.3,
        offset=-0.5,
        reference_prevalence=0.74,
        calibration_changed=True,
        prevalence_changed=True,
        calibration_stat=12.0,
        prevalence_stat=3.0,
    )
    path = folder / "site.json"
    write_site_profile(path, profile_data(fit, model_record(load_predictor(list(ckpts)))))
    return path


def test_a_site_profile_is_applied_as_predict_py_applies_it(
    ckpts: tuple[str, str], films: dict[str, Path], tmp_path: Path
) -> None:
    site = _site_profile(tmp_path, ckpts)
    predictor = load_predictor(list(ckpts))
    profile = load_site_profile(site)
    expected = apply_site_to_rows(predict_files(predictor, list(films.values()), device="cpu"), profile)
    settings = ModelSettings(ckpt=ckpts, site=str(site))
    scorer = FilmScorer(predictor, settings, "cpu")
    answers = scorer.score([scorer.decode(p.read_bytes(), name) for name, p in films.items()])
    for answer, row in zip(answers, expected, strict=True):
        body = answer_json(answer, "m", "p")
        assert body["site"] == row.site == profile.label
        assert abs(body["prob_pneumonia"] - row.prob_pneumonia) <= 1e-6
        assert (body["label"], body["threshold"]) == (row.label, row.threshold) and row.threshold == 0.3
    assert model_info(predictor, settings)["threshold_source"] == f"site profile {profile.label}"
    other = load_predictor(ckpts[0])  # another model: refused before anything is served
    with pytest.raises(SiteProfileError, match="fitted for model"):
        model_info(other, ModelSettings(ckpt=ckpts[0], site=str(site)))


def test_max_batch_size_auto_follows_the_device() -> None:
    assert batch_size("auto", "cpu") == AUTO_BATCH["cpu"] == 4
    assert batch_size(7, "cpu") == 7
    expected = AUTO_BATCH["accelerator"] if torch.cuda.is_available() else AUTO_BATCH["cpu"]
    assert batch_size("auto", "auto") == expected


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(args: list[str], cwd: Path, ready_s: float = 180) -> Iterator[tuple[str, list[str]]]:
    """``python serve.py ARGS port=<free>`` as a user runs it; yields (base URL, its output lines so far)
    once ``/health`` answers 200, and stops it (Ctrl-C) afterwards."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    env.pop("XRAY_API_KEY", None)
    log = cwd / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(PROJECT_ROOT / "serve.py"),
                f"port={port}",
                f"hydra.run.dir={cwd / 'run'}",
                *args,
            ],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            assert proc.poll() is None, f"serve.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
            assert time.monotonic() < deadline, (
                f"serve.py not ready in {ready_s} s:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.5)
        yield url, log.read_text().splitlines()
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """Ctrl-C to the server's process group (LitServe shuts its workers down), then SIGTERM: a shell
    that starts a job in the background makes it ignore SIGINT, and so do its children."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 20), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def post_url(url: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    import json

    request = urllib.request.Request(f"{url}/predict", data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_py_serves_on_a_loopback_port_and_logs_what_it_serves(
    ckpts: tuple[str, str], films: dict[str, Path], tmp_path: Path
) -> None:
    with serve_process([f"ckpt=[{ckpts[0]},{ckpts[1]}]", "max_batch_size=4"], tmp_path) as (url, lines):
        status, body = post_url(url, films["film.dcm"].read_bytes(), {"Content-Type": "application/dicom"})
        assert status == 200 and body["path"] == "upload.dcm"
        status, body = post_url(url, b"")
        assert status == 400
    started = next(line for line in lines if "serving ensemble of 2" in line)
    for fact in (
        "on cpu",
        "precision fp32",
        "batches of up to 4 requests",
        f"http://127.0.0.1:{url.rsplit(':', 1)[1]}/",
    ):
        assert fact in started, started
    assert not (tmp_path / "client.py").exists(), "LitServe's client.py is not generated"


def test_a_bad_checkpoint_exits_2_with_one_error_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "serve.py"),
            f"ckpt={tmp_path / 'nope.ckpt'}",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr


def test_without_the_serve_extra_serve_py_says_what_to_install(tmp_path: Path) -> None:
    hide = (
        "import runpy, sys; sys.modules['litserve'] = None; "
        f"sys.argv = ['serve.py', 'hydra.run.dir={tmp_path}']; runpy.run_path('serve.py', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", hide],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: serving needs the serve extra (litserve is missing): pip install -c constraints.txt -e '.[serve]'"
    )


# ------------------------------------------------------------------------------------------ real data
REAL_FILMS = [
    *sorted((REAL_DATA / "val" / "NORMAL").glob("*.jpeg"))[:2],
    *sorted((REAL_DATA / "val" / "PNEUMONIA").glob("*.jpeg"))[:2],
    *sorted(REAL_FULLRES.rglob("*.jpeg"))[:1],
]


@pytest.mark.realdata
@pytest.mark.skipif(len(REAL_FILMS) < 4, reason="needs ../shared/data/chest_xray (val films)")
def test_the_shipped_ensemble_answers_as_predict_py_on_real_films() -> None:
    expected = predict_files(load_predictor("pretrained"), REAL_FILMS, batch_size=8, device="cpu")
    api = FilmAPI(ModelSettings(ckpt="pretrained"), max_batch_size=8, batch_timeout=0.5)
    with running(api, timeout=300) as (client, _), ThreadPoolExecutor(len(REAL_FILMS)) as pool:
        responses = list(pool.map(lambda p: post_film(client, p.name, p.read_bytes()), REAL_FILMS))
    for path, row, response in zip(REAL_FILMS, expected, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert abs(body["prob_pneumonia"] - row.prob_pneumonia) <= 1e-6, path
        assert body["ood_score"] == pytest.approx(row.ood_score, rel=1e-5), path
        assert (body["label"], body["warning"]) == (row.label, row.warning), path
