"""Getting the chest X-ray data: download, verify, unpack into the Kaggle/Kermany folder layout.

One implementation behind two entry points:

* the command line, ``python -m xray.data.download [--source kermany|pneumoniamnist] [--root DIR]
  [--size 64|128|224] [--yes]``;
* :func:`ensure_dataset`, which training calls before scanning the data folder: it returns the root
  when the data is there, downloads it when asked to (or when the user says yes at a terminal), and
  otherwise raises :class:`DatasetNotFoundError` saying where it looked and how to get the data.

Whatever the source, the result is the layout the rest of the product scans::

    ROOT/train/{NORMAL,PNEUMONIA}/*   ROOT/test/{NORMAL,PNEUMONIA}/*   (ROOT/val/... when the source has one)

Downloads stream to ``<file>.part`` (resumed with an HTTP ``Range`` request after an interruption),
are checked (size, and md5/sha256 or zip CRCs) and only then renamed into place. Unpacking goes to a
temporary sibling of ROOT that is renamed onto ROOT only once complete, so ROOT never looks complete
unless it is. Every failure raises :class:`DownloadError` (or :class:`DatasetNotFoundError`) with a
message that says what failed and how to place the data by hand.

Only the standard library (``urllib``, ``zipfile``) plus ``tqdm``, ``numpy`` and ``Pillow``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO

from xray.constants import CLASSES

__all__ = [
    "DEFAULT_CACHE_DIRNAME",
    "SOURCES",
    "DatasetNotFoundError",
    "DownloadError",
    "Source",
    "convert_pneumoniamnist",
    "dataset_present",
    "download_dataset",
    "download_file",
    "ensure_dataset",
    "extract_kermany",
    "main",
    "manual_instructions",
]

KAGGLE_DATASET = "paultimothymooney/chest-xray-pneumonia"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
MENDELEY_DOI = "10.17632/rscbjbr9sj.2"
MENDELEY_URL = "https://data.mendeley.com/datasets/rscbjbr9sj/2"

DEFAULT_CACHE_DIRNAME = ".downloads"
"""Downloads (and their ``.part`` files) are kept in ``ROOT.parent / DEFAULT_CACHE_DIRNAME``."""

_CHUNK = 1 << 20
_USER_AGENT = "xray-download/0.1 (+python urllib)"
_JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


# --------------------------------------------------------------------------------------------- errors


def manual_instructions(root: str | Path | None = None) -> str:
    """How to get the data by hand; the one hint every error message of this module ends with."""
    where = str(root) if root is not None else "ROOT"
    return (
        "To get the data:\n"
        f"  * run: python -m xray.data.download --root {where}\n"
        f"  * or download it by hand, from Kaggle ({KAGGLE_DATASET}, {KAGGLE_URL})\n"
        f"    or from the Mendeley Data record doi:{MENDELEY_DOI} ({MENDELEY_URL}, ChestXRay2017.zip),\n"
        f"    and unpack it so that {where}/train/NORMAL and {where}/train/PNEUMONIA exist\n"
        f"    ({where} is the folder that holds train/ and test/)."
    )


class DownloadError(RuntimeError):
    """Fetching, verifying or unpacking the data failed. ``problem`` is the first line(s) of the message."""

    def __init__(self, problem: str, *, root: str | Path | None = None) -> None:
        self.problem = problem
        self.root = Path(root) if root is not None else None
        super().__init__(f"{problem}\n\n{manual_instructions(root)}")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset root does not hold the expected layout and nothing was downloaded."""

    def __init__(self, root: str | Path, reason: str = "") -> None:
        self.root = Path(root)
        lines = [
            f"Chest X-ray dataset not found at {self.root}",
            f"(looked for {self.root / 'train' / 'NORMAL'} and {self.root / 'train' / 'PNEUMONIA'}, "
            "each holding at least one image).",
        ]
        if reason:
            lines.append(reason)
        message = "\n".join(lines) + "\n\n" + manual_instructions(self.root)
        super().__init__(message)

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror) otherwise
        return str(self.args[0])


class _CorruptArchiveError(DownloadError):
    """The downloaded file itself is bad (not a zip/npz, CRC error): it must not be reused."""


@contextmanager
def _hint_root(root: Path) -> Iterator[None]:
    """Re-raise a DownloadError whose hint says ROOT with the actual root in it."""
    try:
        yield
    except DownloadError as exc:
        if exc.root is None:
            raise type(exc)(exc.problem, root=root) from None
        raise


# --------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """Where one dataset comes from and how to check it.

    ``url`` and ``filename`` may contain ``{size}``; ``md5``/``sha256`` map an image size to a digest
    (key ``None`` when the file does not depend on the size). A missing digest means: verify the size
    announced by the server and, for zip archives, the CRC of every member.
    """

    name: str
    title: str
    citation: str
    license: str
    homepage: str
    url: str
    filename: str
    kind: str  # "zip" (Kermany archive) or "npz" (MedMNIST arrays)
    approx_size: Mapping[int | None, str]
    sizes: tuple[int, ...] = ()
    md5: Mapping[int | None, str] = field(default_factory=dict)
    sha256: Mapping[int | None, str] = field(default_factory=dict)
    default_root: str = "data/chest_xray"

    def _key(self, size: int | None) -> int | None:
        if not self.sizes:
            return None
        if size not in self.sizes:
            raise ValueError(f"{self.name}: size must be one of {self.sizes}, got {size!r}")
        return size

    def url_for(self, size: int | None = None) -> str:
        return self.url.format(size=self._key(size))

    def filename_for(self, size: int | None = None) -> str:
        return self.filename.format(size=self._key(size))

    def md5_for(self, size: int | None = None) -> str | None:
        return self.md5.get(self._key(size))

    def sha256_for(self, size: int | None = None) -> str | None:
        return self.sha256.get(self._key(size))

    def root_for(self, size: int | None = None) -> str:
        return self.default_root.format(size=self._key(size))

    def describe(self, size: int | None = None) -> str:
        key = self._key(size)
        return f"{self.title} ({self.filename_for(size)}, {self.approx_size.get(key, 'size unknown')})"


SOURCES: dict[str, Source] = {
    "kermany": Source(
        name="kermany",
        title="Kermany et al. chest X-ray images, Mendeley Data V2",
        citation=(
            "Kermany D, Zhang K, Goldbaum M (2018). Labeled Optical Coherence Tomography (OCT) and "
            f"Chest X-Ray Images for Classification. Mendeley Data, V2. doi:{MENDELEY_DOI}"
        ),
        license="CC BY 4.0",
        homepage=MENDELEY_URL,
        url=(
            "https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
            "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded"
        ),
        filename="ChestXRay2017.zip",
        kind="zip",
        approx_size={None: "~1.2 GB"},
        # No published checksum: verified by Content-Length and zip CRCs. Put a sha256 here once known.
        sha256={},
        default_root="data/chest_xray",
    ),
    "pneumoniamnist": Source(
        name="pneumoniamnist",
        title="MedMNIST+ PneumoniaMNIST, Zenodo record 10519652",
        citation=(
            "Yang J, Shi R, Wei D, et al. (2023). MedMNIST v2 - A large-scale lightweight benchmark for "
            "2D and 3D biomedical image classification. Scientific Data 10:41. Zenodo record 10519652."
        ),
        license="CC BY 4.0",
        homepage="https://zenodo.org/records/10519652",
        url="https://zenodo.org/records/10519652/files/pneumoniamnist_{size}.npz?download=1",
        filename="pneumoniamnist_{size}.npz",
        kind="npz",
        # Upper bounds: raw pixels of 5,856 images (the npz may be smaller).
        approx_size={64: "up to ~25 MB", 128: "up to ~100 MB", 224: "up to ~300 MB"},
        sizes=(64, 128, 224),
        # As published by the medmnist package (medmnist 3.0.2, medmnist/info.py, INFO["pneumoniamnist"]).
        md5={
            64: "8f4eceb4ccffa70c672198ea285246c6",
            128: "05b46931834c231683c68f40c47b2971",
            224: "d6a3c71de1b945ea11211b03746c1fe1",
        },
        default_root="data/pneumoniamnist_{size}",
    ),
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown data source {name!r}; choose one of {sorted(SOURCES)}") from None


# --------------------------------------------------------------------------------------------- download


class _Restart(Exception):
    """Internal: the .part file cannot be resumed; start again from byte zero."""


class _Interrupted(Exception):
    """Internal: the transfer stopped early but what arrived is kept in the .part file."""


def _write_chunk(fh: BinaryIO, chunk: bytes) -> None:
    """One write of downloaded bytes (a seam so that tests can simulate a full disk)."""
    fh.write(chunk)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unknown size"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "B" else f"{value:.1f} {unit} ({n} bytes)"
        value /= 1024
    raise AssertionError("unreachable")


def _disk_error(exc: OSError, path: Path, url: str | None = None, need: int | None = None) -> DownloadError:
    where = path.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = None
        need_txt = f"; about {_fmt_bytes(need)} still needed" if need else ""
        return DownloadError(
            f"Not enough disk space writing {path} (no space left on device; free: {_fmt_bytes(free)}"
            f"{need_txt}).\nFree some space (or choose another --root / --cache-dir) and run again"
            + ("; the partial download is kept and will resume." if url else ".")
        )
    src = f" from {url}" if url else ""
    return DownloadError(f"Could not write {path}{src}: {exc.strerror or exc}")


def _digests(path: Path, md5: bool, sha256: bool) -> tuple[str | None, str | None]:
    h_md5 = hashlib.md5(usedforsecurity=False) if md5 else None
    h_sha = hashlib.sha256() if sha256 else None
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            if h_md5 is not None:
                h_md5.update(chunk)
            if h_sha is not None:
                h_sha.update(chunk)
    return (h_md5.hexdigest() if h_md5 else None, h_sha.hexdigest() if h_sha else None)


def _verify_file(
    path: Path,
    url: str,
    *,
    expected_size: int | None,
    md5: str | None,
    sha256: str | None,
    verify: Callable[[Path], None] | None,
) -> None:
    """Check a finished download; on any mismatch delete the file and raise DownloadError."""
    try:
        got_size = path.stat().st_size
        if expected_size is not None and got_size != expected_size:
            raise DownloadError(
                f"Download of {url} has the wrong size: expected {expected_size} bytes, got {got_size}."
            )
        got_md5, got_sha = _digests(path, md5 is not None, sha256 is not None)
        if md5 is not None and got_md5 != md5.lower():
            raise DownloadError(
                f"Checksum mismatch for {url}: expected md5 {md5.lower()}, got {got_md5}.\n"
                "The file was deleted; run again to download it afresh."
            )
        if sha256 is not None and got_sha != sha256.lower():
            raise DownloadError(
                f"Checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {got_sha}.\n"
                "The file was deleted; run again to download it afresh."
            )
        if verify is not None:
            verify(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` -> (start, total); None where absent."""
    if not value:
        return None, None
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(request, timeout=timeout)  # http(s) only: checked by download_file


def _http_error(exc: urllib.error.HTTPError, url: str) -> DownloadError:
    hint = ""
    if exc.code == 404:
        hint = "\nThe file is not (or no longer) at that address."
    elif exc.code in (401, 403):
        hint = "\nThe server refused access (it may require a login or a browser); download it by hand."
    elif exc.code == 429 or exc.code >= 500:
        hint = "\nThe server is busy or failing; try again later (a partial download is kept and resumes)."
    return DownloadError(f"Download failed: HTTP {exc.code} {exc.reason} for {url}.{hint}")


def _network_error(exc: BaseException, url: str, timeout: float) -> DownloadError:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        what = f"timed out after {timeout:g} s"
    else:
        what = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
    return DownloadError(
        f"Could not connect to download {url} ({what}).\n"
        "Check the network connection (and any proxy settings), or fetch the file by hand."
    )


def _transfer(
    url: str,
    part: Path,
    *,
    expected_size: int | None,
    progress: bool,
    timeout: float,
    desc: str,
) -> int | None:
    """One HTTP request that appends to (or restarts) ``part``; returns the total size, when known.

    Raises _Restart when the .part must be thrown away, _Interrupted when the transfer stopped
    early (bytes kept), DownloadError for anything the caller cannot fix by retrying.
    """
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        raise _Restart
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        exc.close()  # the error carries the open response
        if exc.code == 416 and offset > 0:
            # Nothing left to send: the .part holds the whole file (verified by the caller), unless
            # the server says the file is of another size.
            _, total = _parse_content_range(exc.headers.get("Content-Range") if exc.headers else None)
            if total is not None and total != offset:
                raise _Restart from None
            return offset
        raise _http_error(exc, url) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _network_error(exc, url, timeout) from None

    with response:
        status = response.status
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if status == 206 and offset > 0:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start is not None and start != offset:
                raise _Restart
            if total is None and length is not None:
                total = offset + length
            mode = "ab"
        elif status == 200:
            offset, total, mode = 0, length, "wb"  # a fresh start (also: a server that ignores Range)
        else:
            raise DownloadError(f"Download failed: unexpected HTTP {status} {response.reason} for {url}.")

        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(
                f"Download of {url}: the server announces {total} bytes, expected {expected_size}."
            )
        total = total if total is not None else expected_size
        received = offset
        try:
            fh = open(part, mode)  # noqa: SIM115 (closed in finally; OSError there must be classified)
        except OSError as exc:
            raise _disk_error(exc, part, url, total) from None
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
            leave=False,
        )
        finished = False
        try:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except http.client.IncompleteRead as exc:
                    if exc.partial:
                        _write_chunk(fh, exc.partial)
                        received += len(exc.partial)
                    raise _Interrupted(f"connection closed after {received} of {total} bytes") from None
                except (TimeoutError, OSError, http.client.HTTPException) as exc:
                    raise _Interrupted(f"{type(exc).__name__}: {exc} after {received} bytes") from None
                if not chunk:
                    break
                _write_chunk(fh, chunk)
                received += len(chunk)
                bar.update(len(chunk))
            fh.flush()
            finished = True
        except OSError as exc:  # writing (reading errors are handled above)
            raise _disk_error(exc, part, url, None if total is None else total - received) from None
        finally:
            bar.close()
            try:
                fh.close()
            except OSError as exc:  # a failing flush of buffered bytes (disk full)
                if finished:
                    raise _disk_error(exc, part, url) from None
        if total is not None and received < total:
            raise _Interrupted(f"connection closed after {received} of {total} bytes")
        return total


def download_file(
    url: str,
    dest: str | Path,
    *,
    expected_size: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    retries: int = 3,
    retry_wait: float = 2.0,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming that file when it exists.

    * Resumes with ``Range: bytes=N-``: a 206 answer is appended, a 200 answer (server ignoring Range)
      restarts from zero, a 416 answer means the .part is already complete (then verified).
    * Checks the size (``expected_size``, else the server's Content-Length), then ``md5``/``sha256``
      when given, then ``verify(path)`` (e.g. zip CRCs). A mismatch deletes the .part and raises.
    * Only a verified file is moved to ``dest`` (``os.replace``, atomic). An existing ``dest`` that
      passes the same checks is returned without any network access.
    * A transfer cut short is resumed up to ``retries`` times within this call; if it still fails the
      .part is kept so that the next call resumes.

    Every failure raises :class:`DownloadError` (network, HTTP status, size/checksum, disk full).
    """
    dest = Path(dest)
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError(f"Refusing to download {url!r}: only http(s) URLs are supported.")
    part = dest.with_suffix(dest.suffix + ".part")
    check = {"expected_size": expected_size, "md5": md5, "sha256": sha256, "verify": verify}

    if dest.is_file():
        try:
            _verify_file(dest, url, **check)
            return dest
        except DownloadError:
            pass  # _verify_file deleted it: download again
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _disk_error(exc, dest, url) from None

    restarted = False
    attempt = 0
    while True:
        try:
            total = _transfer(
                url, part, expected_size=expected_size, progress=progress, timeout=timeout, desc=dest.name
            )
        except _Restart:
            if restarted:
                raise DownloadError(
                    f"Download of {url} could not be resumed (the server keeps sending a range "
                    "other than the one asked for)."
                ) from None
            restarted = True
            part.unlink(missing_ok=True)
            continue
        except _Interrupted as exc:
            if attempt >= retries:
                raise DownloadError(
                    f"Download of {url} was interrupted ({exc}).\n"
                    f"The partial file {part} is kept: run the same command again to resume."
                ) from None
            attempt += 1
            time.sleep(retry_wait * attempt)
            continue
        break

    _verify_file(
        part,
        url,
        expected_size=expected_size if expected_size is not None else total,
        md5=md5,
        sha256=sha256,
        verify=verify,
    )
    try:
        os.replace(part, dest)
    except OSError as exc:
        raise _disk_error(exc, dest, url) from None
    return dest


# --------------------------------------------------------------------------------------------- layout


def _has_file(directory: Path) -> bool:
    try:
        return any(p.is_file() and not p.name.startswith(".") for p in directory.iterdir())
    except OSError:
        return False


def dataset_present(root: str | Path) -> bool:
    """True when ``root/train/NORMAL`` and ``root/train/PNEUMONIA`` exist and each holds a file."""
    root = Path(root)
    return all(_has_file(root / "train" / name) for name in CLASSES)


def _count_images(root: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val", "test"):
        if (root / split).is_dir():
            counts[split] = {
                name: sum(
                    1 for p in (root / split / name).glob("*") if p.is_file() and not p.name.startswith(".")
                )
                if (root / split / name).is_dir()
                else 0
                for name in CLASSES
            }
    return counts


def _make_tmp_sibling(root: Path, tag: str) -> Path:
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{root.name}.{tag}-", dir=root.parent))
    except OSError as exc:
        raise _disk_error(exc, root) from None


def _install(src: Path, root: Path) -> None:
    """Rename the finished tree ``src`` onto ``root`` (absent or an empty directory)."""
    if root.is_symlink() or root.is_file():
        raise DownloadError(f"Cannot install the dataset: {root} exists and is not a directory.")
    if root.is_dir():
        if any(root.iterdir()):
            raise DownloadError(
                f"Cannot install the dataset: {root} exists, is not empty, and does not hold a complete "
                "dataset. Move it away (or choose another --root) and run again."
            )
        root.rmdir()
    try:
        os.replace(src, root)
    except OSError as exc:
        raise _disk_error(exc, root) from None


def _safe_member_parts(name: str) -> tuple[str, ...]:
    """Path parts of a zip member name; DownloadError when it could escape the target directory."""
    normalized = name.replace("\\", "/")
    if (
        normalized.startswith("/")
        or PureWindowsPath(name).drive
        or PureWindowsPath(name).root
        or "\x00" in name
        or re.match(r"^[A-Za-z]:", normalized)
    ):
        raise DownloadError(f"Unsafe archive: member {name!r} has an absolute path; refusing to extract.")
    parts = tuple(p for p in PurePosixPath(normalized).parts if p not in ("", "."))
    if ".." in parts:
        raise DownloadError(
            f"Unsafe archive: member {name!r} points outside the target; refusing to extract."
        )
    return parts


def _is_junk(parts: tuple[str, ...]) -> bool:
    return any(p == "__MACOSX" for p in parts) or (
        bool(parts) and (parts[-1] in _JUNK_NAMES or parts[-1].startswith("._"))
    )


def _verify_zip(path: Path) -> None:
    """Zip integrity: the central directory reads and every member's CRC matches."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise _CorruptArchiveError(
            f"{path} is not a valid zip archive (truncated or corrupt download?): {exc}. "
            "It was deleted; run again to download it afresh."
        ) from None
    if bad is not None:
        raise _CorruptArchiveError(
            f"{path} is corrupt: member {bad!r} fails its CRC check. "
            "It was deleted; run again to download it afresh."
        )


def _find_dataset_dir(base: Path, max_depth: int = 4) -> Path | None:
    """The directory under ``base`` that holds train/NORMAL and train/PNEUMONIA with the most files.

    The archive may nest it (``chest_xray/...``, ``ChestXRay2017/chest_xray/...``,
    ``chest_xray/chest_xray/...``); ties go to the shallowest.
    """
    best: tuple[int, int, Path] | None = None
    frontier = [(base, 0)]
    while frontier:
        directory, depth = frontier.pop()
        if all((directory / "train" / name).is_dir() for name in CLASSES):
            n = sum(1 for name in CLASSES for p in (directory / "train" / name).iterdir() if p.is_file())
            if best is None or (n, -depth) > (best[0], -best[1]):
                best = (n, depth, directory)
        if depth < max_depth:
            frontier.extend((d, depth + 1) for d in directory.iterdir() if d.is_dir() and not d.is_symlink())
    return best[2] if best else None


def extract_kermany(zip_path: str | Path, root: str | Path) -> Path:
    """Unpack the Kermany archive (``ChestXRay2017.zip`` or the Kaggle zip) so that ROOT/train/... exists.

    Members under ``__MACOSX/``, ``.DS_Store`` and ``._*`` files are skipped; absolute names and names
    with ``..`` are rejected before anything is written (zip-slip). The archive is unpacked into a
    temporary sibling of ``root``; the ``chest_xray`` folder is located inside (however nested),
    checked (train/NORMAL and train/PNEUMONIA non-empty) and renamed onto ``root``. On any failure
    the temporary directory is removed and ``root`` is left as it was.
    """
    zip_path, root = Path(zip_path), Path(root)
    with _hint_root(root):
        try:
            zf = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise _CorruptArchiveError(
                f"Cannot open {zip_path} as a zip archive (truncated or corrupt download?): {exc}"
            ) from None
        with zf:
            members = [(info, _safe_member_parts(info.filename)) for info in zf.infolist()]
            tmp = _make_tmp_sibling(root, "extract")
            try:
                for info, parts in members:
                    if not parts or _is_junk(parts):
                        continue
                    target = tmp.joinpath(*parts)
                    try:
                        if info.is_dir():
                            target.mkdir(parents=True, exist_ok=True)
                            continue
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst, _CHUNK)  # CRC checked at the end of src
                    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
                        raise _CorruptArchiveError(
                            f"{zip_path} is corrupt at member {info.filename!r} ({exc}); delete it and "
                            "download again."
                        ) from None
                    except OSError as exc:
                        raise _disk_error(exc, target) from None
                found = _find_dataset_dir(tmp)
                if found is None or not dataset_present(found):
                    raise DownloadError(
                        f"{zip_path} does not contain the expected layout: no folder with non-empty "
                        "train/NORMAL and train/PNEUMONIA (expected e.g. chest_xray/train/NORMAL)."
                    )
                _install(found, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_pmnist_split(data: Any, split: str, tmp: Path, npz_path: Path) -> bool:
    """PNG files of one split of a MedMNIST npz under ``tmp/split/CLASS``; False when the split is absent."""
    import numpy as np
    from PIL import Image

    key_img, key_lab = f"{split}_images", f"{split}_labels"
    if key_img not in data.files or key_lab not in data.files:
        return False
    try:
        images, labels = data[key_img], np.asarray(data[key_lab]).reshape(-1)
    except (ValueError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise _CorruptArchiveError(f"{npz_path}: cannot read {key_img}: {exc}") from None
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise DownloadError(
            f"{npz_path}: {key_img} has shape {images.shape} for {len(labels)} labels; expected (N, H, W)."
        )
    if images.dtype != np.uint8:
        raise DownloadError(f"{npz_path}: {key_img} is {images.dtype}, expected uint8.")
    if not np.isin(labels, (0, 1)).all():
        raise DownloadError(f"{npz_path}: {key_lab} holds labels other than 0 (normal) and 1 (pneumonia).")
    for name in CLASSES:
        (tmp / split / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True), start=1):
        target = tmp / split / CLASSES[int(label)] / f"pmnist_{split}_{i:05d}.png"
        try:
            Image.fromarray(np.ascontiguousarray(image)).save(target, format="PNG")
        except OSError as exc:
            raise _disk_error(exc, target) from None
    return True


def convert_pneumoniamnist(npz_path: str | Path, root: str | Path) -> Path:
    """Write a MedMNIST PneumoniaMNIST ``.npz`` as PNG files in the Kaggle layout under ``root``.

    ``root/{train,val,test}/{NORMAL,PNEUMONIA}/pmnist_<split>_<NNNNN>.png`` (1-based index within the
    split); label 0 = NORMAL, 1 = PNEUMONIA, so the rest of the product scans it unchanged.

    * The official MedMNIST validation split exists and is kept as ``val/`` (MedMNIST split the
      source training set 9:1 into train/val, and uses the source's own test set as test).
    * These images carry no patient ids: each image is its own group for any patient-grouped split,
      so a validation set carved from train may put films of one patient on both sides; prefer the
      official ``val/``.

    Written into a temporary sibling and renamed onto ``root`` at the end, so ``root`` never looks
    complete unless it is; on failure the temporary directory is removed.
    """
    import numpy as np

    npz_path, root = Path(npz_path), Path(root)
    with _hint_root(root):
        try:
            data = np.load(npz_path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise _CorruptArchiveError(
                f"Cannot read {npz_path} as a .npz file (corrupt download?): {exc}"
            ) from None
        tmp = _make_tmp_sibling(root, "convert")
        try:
            with data:
                for split in ("train", "val", "test"):
                    if not _write_pmnist_split(data, split, tmp, npz_path) and split == "train":
                        raise DownloadError(f"{npz_path} has no train_images/train_labels arrays.")
            if not dataset_present(tmp):
                raise DownloadError(f"{npz_path}: the training split lacks one of the classes {CLASSES}.")
            _install(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# --------------------------------------------------------------------------------------------- dataset


def download_dataset(
    root: str | Path,
    source: str = "kermany",
    size: int = 224,
    *,
    url: str | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
    keep_archive: bool = False,
    progress: bool = True,
    timeout: float = 60,
    retries: int = 3,
    retry_wait: float = 2.0,
) -> Path:
    """Download ``source`` and lay it out under ``root``; returns ``root``. A no-op when it is present.

    The download lives in ``cache_dir`` (default ``root.parent / ".downloads"``) so that an
    interrupted run resumes; the archive is deleted after a successful unpack unless
    ``keep_archive``. ``url``/``md5``/``sha256`` override the source's (mirrors, tests).
    """
    root = Path(root).expanduser()
    if dataset_present(root):
        return root
    spec = get_source(source)
    key = size if spec.sizes else None
    with _hint_root(root):
        cache = Path(cache_dir).expanduser() if cache_dir is not None else root.parent / DEFAULT_CACHE_DIRNAME
        archive = cache / spec.filename_for(key)
        download_file(
            url or spec.url_for(key),
            archive,
            md5=md5 or spec.md5_for(key),
            sha256=sha256 or spec.sha256_for(key),
            progress=progress,
            timeout=timeout,
            retries=retries,
            retry_wait=retry_wait,
            verify=_verify_zip if spec.kind == "zip" else None,
        )
        try:
            if spec.kind == "zip":
                extract_kermany(archive, root)
            else:
                convert_pneumoniamnist(archive, root)
        except _CorruptArchiveError:
            archive.unlink(missing_ok=True)  # do not reuse a bad archive next time
            raise
    if not keep_archive:
        archive.unlink(missing_ok=True)
        with suppress(OSError):
            cache.rmdir()  # only when empty
    return root


def _ask(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def ensure_dataset(
    root: str | Path,
    source: str = "kermany",
    size: int = 224,
    download: bool = False,
    interactive: bool | None = None,
    **download_kwargs: Any,
) -> Path:
    """Return ``root`` when it holds the dataset; otherwise get it or say how to.

    * ``download=True``: download and unpack ``source`` (see :func:`download_dataset`; extra keyword
      arguments such as ``url=`` or ``cache_dir=`` are passed on).
    * ``download=False`` and interactive (default: stdin is a terminal): ask
      ``Download ... to ROOT? [y/N]``.
    * Otherwise raise :class:`DatasetNotFoundError` naming ROOT and the download command.
    """
    root = Path(root).expanduser()
    if dataset_present(root):
        return root
    spec = get_source(source)
    key = size if spec.sizes else None
    if not download:
        if interactive is None:
            interactive = _stdin_is_tty()
        if not interactive:
            raise DatasetNotFoundError(root)
        if not _ask(f"Dataset not found at {root}. Download {spec.describe(key)} to {root}? [y/N] "):
            raise DatasetNotFoundError(root, "Download declined.")
    return download_dataset(root, source, size, **download_kwargs)


# --------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xray.data.download",
        description=(
            "Download a chest X-ray dataset and unpack it into ROOT/{train,test[,val]}/{NORMAL,PNEUMONIA}. "
            "Interrupted downloads resume. Sources: kermany = Kermany et al., Mendeley Data V2, "
            f"doi:{MENDELEY_DOI} (CC BY 4.0, ~1.2 GB); pneumoniamnist = MedMNIST+ PneumoniaMNIST, "
            "Zenodo 10519652 (CC BY 4.0), as PNG files."
        ),
    )
    parser.add_argument("--source", choices=sorted(SOURCES), default="kermany")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="dataset root (default: data/chest_xray, or data/pneumoniamnist_SIZE)",
    )
    parser.add_argument("--size", type=int, choices=(64, 128, 224), default=224, help="pneumoniamnist only")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--url", default=None, help="download from this URL instead (a mirror)")
    parser.add_argument("--md5", default=None, help="expected md5 of the file at --url")
    parser.add_argument("--sha256", default=None, help="expected sha256 of the file at --url")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="where downloads go (default ROOT/../.downloads)"
    )
    parser.add_argument(
        "--keep-archive", action="store_true", help="keep the downloaded file after unpacking"
    )
    parser.add_argument("--timeout", type=float, default=60, help="network timeout in seconds (default 60)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 error or declined, 130 interrupted)."""
    args = _parser().parse_args(argv)
    spec = SOURCES[args.source]
    key = args.size if spec.sizes else None
    root: Path = (args.root if args.root is not None else Path(spec.root_for(key))).expanduser()
    try:
        if dataset_present(root):
            print(f"Dataset already present at {root}; nothing to do.")
            return 0
        if not args.yes and _stdin_is_tty() and not _ask(f"Download {spec.describe(key)} to {root}? [y/N] "):
            print("Aborted.", file=sys.stderr)
            return 1
        print(
            f"Downloading {spec.describe(key)}\n  from {args.url or spec.url_for(key)}\n  licence {spec.license}: "
            f"{spec.citation}",
            file=sys.stderr,
        )
        download_dataset(
            root,
            args.source,
            args.size,
            url=args.url,
            md5=args.md5,
            sha256=args.sha256,
            cache_dir=args.cache_dir,
            keep_archive=args.keep_archive,
            progress=not args.no_progress,
            timeout=args.timeout,
        )
    except (DownloadError, DatasetNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted; run the same command again to resume the download.", file=sys.stderr)
        return 130
    counts = _count_images(root)
    summary = ", ".join(
        f"{split}: " + " / ".join(f"{n} {c}" for c, n in per.items()) for split, per in counts.items()
    )
    print(f"Dataset ready at {root} ({summary}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
