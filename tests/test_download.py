"""xray.data.download against a local HTTP server on 127.0.0.1 (no internet): resume, errors, layouts."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import re
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray.data import download as dl
from xray.data.download import (
    SOURCES,
    DatasetNotFoundError,
    DownloadError,
    convert_pneumoniamnist,
    dataset_present,
    download_dataset,
    download_file,
    ensure_dataset,
    extract_kermany,
)
from xray.download import main

# ----------------------------------------------------------------------------------------- HTTP server


@dataclass
class ServerState:
    directory: Path
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)  # (path, Range, status)
    not_found: set[str] = field(default_factory=set)
    cut_next: int = 0  # this many responses send half their body, then close
    ignore_range: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    timeout = 3  # per-request socket timeout
    state: ServerState  # set on a subclass per server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        state = self.state
        name = self.path.split("?", 1)[0].lstrip("/")
        range_header = self.headers.get("Range")
        file = state.directory / name
        if name in state.not_found or not name or not file.is_file():
            self._record(name, range_header, 404)
            self.send_error(404, "Not Found")
            return
        data = file.read_bytes()
        status, body, headers = 200, data, {}
        m = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if m and not state.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                self._record(name, range_header, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status, body = 206, data[start:]
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        with state.lock:
            cut = state.cut_next > 0
            state.cut_next -= int(cut)
        self._record(name, range_header, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if cut else body)
        self.wfile.flush()
        self.close_connection = True

    def _record(self, name: str, range_header: str | None, status: int) -> None:
        with self.state.lock:
            self.state.requests.append((name, range_header, status))


@dataclass
class Server:
    state: ServerState
    base: str

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def put(self, name: str, data: bytes) -> str:
        (self.state.directory / name).write_bytes(data)
        return self.url(name)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib must talk to 127.0.0.1 directly, whatever the environment says."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    directory = tmp_path / "served"
    directory.mkdir()
    state = ServerState(directory)
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(state, f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------- fixtures


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def kermany_zip(prefix: str = "ChestXRay2017/") -> bytes:
    """A tiny archive in the Mendeley layout, with macOS junk, nested under ``prefix``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}chest_xray/", b"")
        for split, n in (("train", 2), ("test", 1)):
            for cls in ("NORMAL", "PNEUMONIA"):
                for i in range(n):
                    zf.writestr(f"{prefix}chest_xray/{split}/{cls}/{cls.lower()}_{i}.png", _png(40 * i + 1))
        zf.writestr(f"{prefix}chest_xray/.DS_Store", b"junk")
        zf.writestr(f"{prefix}chest_xray/train/NORMAL/.DS_Store", b"junk")
        zf.writestr(f"{prefix}chest_xray/train/NORMAL/._normal_0.png", b"junk")
        zf.writestr("__MACOSX/chest_xray/._x.png", b"junk")
        zf.writestr(f"__MACOSX/{prefix}chest_xray/train/PNEUMONIA/._pneumonia_0.png", b"junk")
    return buf.getvalue()


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []


EXPECTED_KERMANY = {
    "train/NORMAL/normal_0.png",
    "train/NORMAL/normal_1.png",
    "train/PNEUMONIA/pneumonia_0.png",
    "train/PNEUMONIA/pneumonia_1.png",
    "test/NORMAL/normal_0.png",
    "test/PNEUMONIA/pneumonia_0.png",
}

FAST = {"progress": False, "timeout": 3, "retries": 0, "retry_wait": 0.0}


# ----------------------------------------------------------------------------------------- download_file


def test_download_file_verifies_and_replaces_atomically(server: Server, tmp_path: Path) -> None:
    data = bytes(range(256)) * 100
    url = server.put("blob.bin", data)
    dest = tmp_path / "out" / "blob.bin"
    sha = hashlib.sha256(data).hexdigest()
    assert download_file(url, dest, known_hash=f"sha256:{sha}", **FAST) == dest
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]  # no .part, no temporary file
    # Already there and valid: no second request.
    n = len(server.state.requests)
    download_file(url, dest, known_hash=f"md5:{hashlib.md5(data).hexdigest()}", **FAST)
    assert len(server.state.requests) == n


def test_checksum_mismatch_deletes_part_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    url = server.put("ChestXRay2017.zip", kermany_zip())
    root = tmp_path / "data" / "chest_xray"
    with pytest.raises(DownloadError) as info:
        download_dataset(root, url=url, sha256="0" * 64, **FAST)
    message = str(info.value)
    assert "sha256" in message and "0" * 64 in message and url in message
    assert f"python -m xray.download --root {root}" in message
    assert not root.exists()
    cache = root.parent / ".downloads"
    assert not any(cache.iterdir()), "neither the file nor its .part may remain"
    assert _siblings(root) == [".downloads"]  # no temporary extraction directory either


def test_md5_mismatch(server: Server, tmp_path: Path) -> None:
    url = server.put("x.npz", b"abc")
    dest = tmp_path / "x.npz"
    with pytest.raises(DownloadError, match=r"expected md5:f+ but got 9001"):
        download_file(url, dest, known_hash="md5:" + "f" * 32, **FAST)
    assert not dest.exists() and not (tmp_path / "x.npz.part").exists()


def test_interrupted_transfer_resumes_with_range(server: Server, tmp_path: Path) -> None:
    data = bytes(range(256)) * 64
    url = server.put("big.bin", data)
    dest = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"
    server.state.cut_next = 1
    with pytest.raises(DownloadError, match="interrupted") as info:
        download_file(url, dest, known_hash=f"md5:{hashlib.md5(data).hexdigest()}", **FAST)
    assert "resume" in str(info.value)
    assert not dest.exists()
    assert part.read_bytes() == data[: len(data) // 2]

    download_file(url, dest, known_hash=f"md5:{hashlib.md5(data).hexdigest()}", **FAST)
    assert dest.read_bytes() == data and not part.exists()
    assert server.state.requests[-1] == ("big.bin", f"bytes={len(data) // 2}-", 206)


def test_interrupted_transfer_retries_within_one_call(server: Server, tmp_path: Path) -> None:
    data = b"0123456789" * 1000
    url = server.put("r.bin", data)
    server.state.cut_next = 1
    dest = download_file(url, tmp_path / "r.bin", **{**FAST, "retries": 1})
    assert dest.read_bytes() == data
    assert [(r[1], r[2]) for r in server.state.requests] == [(None, 200), ("bytes=5000-", 206)]


def test_server_ignoring_range_restarts_cleanly(server: Server, tmp_path: Path) -> None:
    data = b"abcdefgh" * 1000
    url = server.put("n.bin", data)
    server.state.ignore_range = True
    dest = tmp_path / "n.bin"
    (tmp_path / "n.bin.part").write_bytes(b"GARBAGE-NOT-A-PREFIX")
    download_file(url, dest, known_hash=f"sha256:{hashlib.sha256(data).hexdigest()}", **FAST)
    assert dest.read_bytes() == data
    assert server.state.requests == [("n.bin", "bytes=20-", 200)]


def test_complete_part_gets_416_and_is_verified(server: Server, tmp_path: Path) -> None:
    data = b"complete" * 100
    url = server.put("c.bin", data)
    (tmp_path / "c.bin.part").write_bytes(data)
    dest = download_file(url, tmp_path / "c.bin", known_hash=f"md5:{hashlib.md5(data).hexdigest()}", **FAST)
    assert dest.read_bytes() == data
    assert server.state.requests == [("c.bin", f"bytes={len(data)}-", 416)]


def test_404_names_url_status_and_manual_hint(server: Server, tmp_path: Path) -> None:
    url = server.url("missing.zip")
    with pytest.raises(DownloadError) as info:
        download_file(url, tmp_path / "missing.zip", **FAST)
    message = str(info.value)
    assert "HTTP 404" in message and url in message
    assert "python -m xray.download --root" in message
    assert "paultimothymooney/chest-xray-pneumonia" in message and "10.17632/rscbjbr9sj.2" in message
    assert not (tmp_path / "missing.zip").exists() and not (tmp_path / "missing.zip.part").exists()


def test_connection_refused_is_a_clear_error(closed_port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port}/ChestXRay2017.zip"
    root = tmp_path / "chest_xray"
    with pytest.raises(DownloadError) as info:
        download_dataset(root, url=url, **FAST)
    message = str(info.value)
    assert "Could not connect" in message and url in message and "refused" in message.lower()
    assert f"--root {root}" in message
    assert not root.exists()


def test_silent_server_times_out(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.zip"
        with pytest.raises(DownloadError, match=r"timed out after 0.5 s"):
            download_file(url, tmp_path / "x.zip", **{**FAST, "timeout": 0.5})


def test_disk_full_while_writing(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = server.put("d.bin", b"z" * 5000)

    def full(fh: object, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl, "_write_chunk", full)
    with pytest.raises(DownloadError, match="disk space") as info:
        download_file(url, tmp_path / "d.bin", **FAST)
    assert "python -m xray.download" in str(info.value)
    assert not (tmp_path / "d.bin").exists()


def test_only_http_urls(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="only http"):
        download_file("file:///etc/passwd", tmp_path / "x", **FAST)


# ----------------------------------------------------------------------------------------- Kermany zip


def test_kermany_download_extracts_layout_and_skips_junk(server: Server, tmp_path: Path) -> None:
    url = server.put("ChestXRay2017.zip", kermany_zip())
    root = tmp_path / "data" / "chest_xray"
    assert download_dataset(root, url=url, **FAST) == root
    assert dataset_present(root)
    assert _files(root) == EXPECTED_KERMANY
    assert _siblings(root) == ["chest_xray"]  # archive deleted, cache dir and temp dir gone


@pytest.mark.parametrize("prefix", ["", "chest_xray/", "ChestXRay2017/"])
def test_extract_finds_nested_chest_xray(tmp_path: Path, prefix: str) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(kermany_zip(prefix))
    root = tmp_path / "out" / "root"
    extract_kermany(archive, root)
    assert _files(root) == EXPECTED_KERMANY
    assert _siblings(root) == ["root"]


def test_truncated_zip(server: Server, tmp_path: Path) -> None:
    data = kermany_zip()
    truncated = data[: len(data) * 2 // 3]
    archive = tmp_path / "t.zip"
    archive.write_bytes(truncated)
    root = tmp_path / "out" / "chest_xray"
    with pytest.raises(DownloadError, match="zip"):
        extract_kermany(archive, root)
    assert not root.exists() and _siblings(root) == []

    # The same file served over HTTP fails the integrity check and is not kept.
    url = server.put("ChestXRay2017.zip", truncated)
    with pytest.raises(DownloadError, match="not a valid zip"):
        download_dataset(root, url=url, **FAST)
    assert not root.exists()
    assert _siblings(root) == [".downloads"] and not any((root.parent / ".downloads").iterdir())


def test_corrupt_member_leaves_no_half_extracted_tree(tmp_path: Path) -> None:
    data = bytearray(kermany_zip())
    marker = _png(41)  # content of the *_1.png files; corrupt the first stored copy
    i = bytes(data).index(marker)
    data[i + len(marker) // 2] ^= 0xFF
    archive = tmp_path / "bad.zip"
    archive.write_bytes(bytes(data))
    root = tmp_path / "out" / "chest_xray"
    with pytest.raises(DownloadError, match="corrupt"):
        extract_kermany(archive, root)
    assert not root.exists() and _siblings(root) == []


EVIL_ABSOLUTE = "/tmp/xray-test-zip-slip-evil.png"


@pytest.mark.parametrize("evil", ["../evil.png", "chest_xray/../../evil.png", EVIL_ABSOLUTE, "C:/evil.png"])
def test_zip_slip_stays_inside_root(tmp_path: Path, evil: str) -> None:
    """ZipFile.extract drops absolute prefixes and '..': the member lands inside the unpacking folder."""
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("chest_xray/train/NORMAL/a.png", _png(1))
        zf.writestr("chest_xray/train/PNEUMONIA/b.png", _png(2))
        zf.writestr(evil, b"pwned")
    root = tmp_path / "out" / "chest_xray"
    Path(EVIL_ABSOLUTE).unlink(missing_ok=True)
    extract_kermany(archive, root)
    assert {"train/NORMAL/a.png", "train/PNEUMONIA/b.png"} <= _files(root)
    assert _siblings(root) == ["chest_xray"]
    outside_root = _files(tmp_path) - {"evil.zip"} - {f"out/chest_xray/{name}" for name in _files(root)}
    assert not outside_root and not Path(EVIL_ABSOLUTE).exists()


def test_archive_without_layout(tmp_path: Path) -> None:
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("chest_xray/train/NORMAL/a.png", _png(1))
    root = tmp_path / "out" / "chest_xray"
    with pytest.raises(DownloadError, match="expected layout"):
        extract_kermany(archive, root)
    assert not root.exists() and _siblings(root) == []


# ----------------------------------------------------------------------------------------- PneumoniaMNIST


def _pmnist_npz(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = {
        "train": np.array([0, 1, 1, 0, 1, 1]),
        "val": np.array([0, 1]),
        "test": np.array([1, 0]),
    }
    arrays: dict[str, np.ndarray] = {}
    for split, lab in labels.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(len(lab), 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = lab.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return arrays


def test_pneumoniamnist_download_and_convert(server: Server, tmp_path: Path) -> None:
    npz = tmp_path / "pneumoniamnist_64.npz"
    arrays = _pmnist_npz(npz)
    data = npz.read_bytes()
    url = server.put("pneumoniamnist_64.npz", data) + "?download=1"
    root = tmp_path / "data" / "pmnist"
    download_dataset(root, "pneumoniamnist", 64, url=url, md5=hashlib.md5(data).hexdigest(), **FAST)
    counts = {
        f"{split}/{cls}": len(list((root / split / cls).glob("*.png")))
        for split in ("train", "val", "test")
        for cls in ("NORMAL", "PNEUMONIA")
    }
    assert counts == {
        "train/NORMAL": 2,
        "train/PNEUMONIA": 4,
        "val/NORMAL": 1,
        "val/PNEUMONIA": 1,
        "test/NORMAL": 1,
        "test/PNEUMONIA": 1,
    }
    image = np.asarray(Image.open(root / "train" / "PNEUMONIA" / "pmnist_train_00002.png"))
    assert image.shape == (28, 28) and np.array_equal(image, arrays["train_images"][1])
    assert _siblings(root) == ["pmnist"]


def test_pneumoniamnist_bad_md5(server: Server, tmp_path: Path) -> None:
    npz = tmp_path / "p.npz"
    _pmnist_npz(npz)
    url = server.put("p.npz", npz.read_bytes())
    root = tmp_path / "data" / "pmnist"
    with pytest.raises(DownloadError, match="md5"):
        download_dataset(root, "pneumoniamnist", 64, url=url, md5="0" * 32, **FAST)
    assert not root.exists()


def test_convert_rejects_bad_labels(tmp_path: Path) -> None:
    npz = tmp_path / "bad.npz"
    np.savez(npz, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([[0], [7]]))
    root = tmp_path / "out" / "r"
    with pytest.raises(DownloadError, match="labels"):
        convert_pneumoniamnist(npz, root)
    assert not root.exists() and _siblings(root) == []


def test_source_specs() -> None:
    pm = SOURCES["pneumoniamnist"]
    assert pm.url_for(128) == "https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz?download=1"
    assert pm.md5_for(64) == "8f4eceb4ccffa70c672198ea285246c6"
    assert pm.md5_for(128) == "05b46931834c231683c68f40c47b2971"
    assert pm.md5_for(224) == "d6a3c71de1b945ea11211b03746c1fe1"
    with pytest.raises(ValueError, match="size"):
        pm.url_for(28)
    km = SOURCES["kermany"]
    assert km.url_for().startswith("https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/")
    assert km.sha256_for() is None and km.md5_for() is None and km.filename_for() == "ChestXRay2017.zip"


# ----------------------------------------------------------------------------------------- ensure_dataset


def test_ensure_dataset_missing_non_interactive(tmp_path: Path) -> None:
    root = tmp_path / "nowhere" / "chest_xray"
    with pytest.raises(DatasetNotFoundError) as info:
        ensure_dataset(root, interactive=False)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(root) in message and f"python -m xray.download --root {root}" in message
    assert "paultimothymooney/chest-xray-pneumonia" in message
    assert not root.exists()


def test_ensure_dataset_present_needs_no_network(tmp_path: Path, closed_port: int) -> None:
    root = tmp_path / "chest_xray"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "train" / cls).mkdir(parents=True)
        (root / "train" / cls / "a.png").write_bytes(_png(1))
    assert ensure_dataset(root, download=True, url=f"http://127.0.0.1:{closed_port}/x") == root


def test_dataset_present_needs_files(tmp_path: Path) -> None:
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "train" / cls).mkdir(parents=True)
    (tmp_path / "train" / "NORMAL" / ".DS_Store").write_bytes(b"")
    assert not dataset_present(tmp_path)
    (tmp_path / "train" / "NORMAL" / "a.png").write_bytes(b"x")
    assert not dataset_present(tmp_path)
    (tmp_path / "train" / "PNEUMONIA" / "b.png").write_bytes(b"x")
    assert dataset_present(tmp_path)


def test_ensure_dataset_downloads_and_keeps_partial_beside_root(server: Server, tmp_path: Path) -> None:
    url = server.put("ChestXRay2017.zip", kermany_zip())
    root = tmp_path / "d" / "chest_xray"
    server.state.cut_next = 1
    with pytest.raises(DownloadError, match="interrupted"):
        ensure_dataset(root, download=True, url=url, **FAST)
    assert (root.parent / ".downloads" / "ChestXRay2017.zip.part").is_file()
    assert not root.exists()
    assert ensure_dataset(root, download=True, url=url, **FAST) == root
    assert _files(root) == EXPECTED_KERMANY
    assert server.state.requests[-1][1] is not None  # resumed with a Range request


@pytest.mark.parametrize(("answer", "downloads"), [("y", True), ("n", False), (EOFError, False)])
def test_ensure_dataset_interactive(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: object, downloads: bool
) -> None:
    url = server.put("ChestXRay2017.zip", kermany_zip())
    root = tmp_path / "chest_xray"
    asked: list[str] = []

    def fake_input(prompt: str) -> str:
        asked.append(prompt)
        if answer is EOFError:
            raise EOFError
        return str(answer)

    monkeypatch.setattr("builtins.input", fake_input)
    if downloads:
        assert ensure_dataset(root, interactive=True, url=url, **FAST) == root
        assert dataset_present(root)
    else:
        with pytest.raises(DatasetNotFoundError, match="declined"):
            ensure_dataset(root, interactive=True, url=url, **FAST)
        assert not server.state.requests
    assert len(asked) == 1 and "~1.2 GB" in asked[0] and str(root) in asked[0] and "[y/N]" in asked[0]


# ----------------------------------------------------------------------------------------- CLI


def test_cli_404_exits_1_without_traceback(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.url("gone.zip")
    root = tmp_path / "chest_xray"
    assert main(["--root", str(root), "--url", url, "--yes", "--no-progress", "--timeout", "3"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "HTTP 404" in err and url in err and f"--root {root}" in err


def test_training_entry_reports_a_download_error_once(
    closed_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train.py's fail_cleanly: the ``error:`` line on stderr and a copy in the log file, not on the console log."""
    from xray.cli import fail_cleanly

    console_text = io.StringIO()
    handlers = [logging.StreamHandler(console_text), logging.FileHandler(tmp_path / "train.log")]
    root_logger = logging.getLogger()
    for handler in handlers:
        root_logger.addHandler(handler)
    try:
        with pytest.raises(SystemExit) as exit_info, fail_cleanly(logging.getLogger("xray")):
            download_dataset(tmp_path / "chest_xray", url=f"http://127.0.0.1:{closed_port}/x.zip", **FAST)
    finally:
        for handler in handlers:
            root_logger.removeHandler(handler)
            handler.close()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("Could not connect") == 1
    assert "Could not connect" not in console_text.getvalue()
    assert "Could not connect" in (tmp_path / "train.log").read_text()


def test_cli_success_and_already_present(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.put("ChestXRay2017.zip", kermany_zip())
    root = tmp_path / "chest_xray"
    argv = ["--root", str(root), "--url", url, "--yes", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Dataset ready" in out and "2 NORMAL" in out
    assert main(argv) == 0
    assert "already present" in capsys.readouterr().out
