"""Getting the chest X-ray data: download, verify and unpack it into the Kaggle/Kermany layout
``ROOT/{train,test[,val]}/{NORMAL,PNEUMONIA}/*``, from the command line (``python -m xray.download``)
or from training (:func:`ensure_dataset`).

Unpacking goes to a temporary sibling of ROOT that is renamed onto ROOT only once complete, so ROOT
never looks complete unless it is. Every failure raises :class:`DownloadError` (or
:class:`DatasetNotFoundError`) saying what failed and how to place the data by hand.
"""

from __future__ import annotations

import errno
import logging
import os
import runpy
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from xray.core.constants import CLASSES
from xray.core.errors import UserError

KAGGLE_DATASET = "paultimothymooney/chest-xray-pneumonia"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
MENDELEY_DOI = "10.17632/rscbjbr9sj.2"
MENDELEY_URL = "https://data.mendeley.com/datasets/rscbjbr9sj/2"

DEFAULT_CACHE_DIRNAME = ".downloads"  # in ROOT.parent: downloads and their .part files

_CHUNK = 1 << 20
_JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


# --------------------------------------------------------------------------------------------- errors


def manual_instructions(root: str | Path | None = None) -> str:
    """How to get the data by hand: the hint every error message of this module ends with."""
    where = str(root) if root is not None else "ROOT"
    return (
        "To get the data:\n"
        f"  * run: python -m xray.download --root {where}\n"
        f"  * or download it by hand, from Kaggle ({KAGGLE_DATASET}, {KAGGLE_URL})\n"
        f"    or from the Mendeley Data record doi:{MENDELEY_DOI} ({MENDELEY_URL}, ChestXRay2017.zip),\n"
        f"    and unpack it so that {where}/train/NORMAL and {where}/train/PNEUMONIA exist\n"
        f"    ({where} is the folder that holds train/ and test/)."
    )


class DownloadError(UserError, RuntimeError):
    """Fetching, verifying or unpacking the data failed. ``problem`` is the first line(s) of the message."""

    def __init__(self, problem: str, *, root: str | Path | None = None) -> None:
        self.problem = problem
        self.root = Path(root) if root is not None else None
        super().__init__(f"{problem}\n\n{manual_instructions(root)}")


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset root does not hold the expected layout and nothing was downloaded."""

    def __init__(self, root: str | Path, reason: str = "") -> None:
        self.root = Path(root)
        lines = [
            f"Chest X-ray dataset not found at {self.root}",
            f"(looked for {self.root / 'train' / 'NORMAL'} and {self.root / 'train' / 'PNEUMONIA'}, "
            "each holding at least one image).",
            *([reason] if reason else []),
        ]
        super().__init__("\n".join(lines) + "\n\n" + manual_instructions(self.root))

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

    ``url``, ``filename`` and ``default_root`` may contain ``{size}``; the mappings are keyed by size
    (``None`` when the file does not depend on it). Without a digest, zip CRCs are checked on unpacking.
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
        approx_size={None: "~1.2 GB"},  # no published checksum: put a sha256 here once known
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


class _Interrupted(Exception):
    """The transfer stopped part-way; what arrived is kept in the .part file for the next try."""


def _write_chunk(fh: BinaryIO, chunk: bytes) -> None:
    """One write of downloaded bytes (a seam so that tests can simulate a full disk)."""
    fh.write(chunk)


def _resuming_download(
    url: str, output_file: str, pooch: object, *, part: Path, progress: bool, timeout: float
) -> None:
    """A pooch downloader that keeps an interrupted transfer in ``part`` and asks only for the rest.

    The Kermany archive is 1.2 GB, so a cut connection resumes with ``Range: bytes=N-``: 206 appends,
    200 (Range ignored) starts over, 416 means the .part is complete. pooch then checks the hash.
    """
    import requests
    import urllib3
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={offset}-"} if offset else {})
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code != 416 or not offset:
            response.raise_for_status()
            offset = offset if response.status_code == 206 else 0
            length_header = response.headers.get("Content-Length", "")
            length = int(length_header) if length_header.isdigit() else None
            bar = tqdm(
                total=length and offset + length,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.stem,
                disable=not progress,
                leave=False,
            )
            with open(part, "ab" if offset else "wb") as fh, bar:
                try:  # raw: requests' iter_content drops the last partial chunk of a cut transfer
                    for chunk in response.raw.stream(_CHUNK, decode_content=False):
                        _write_chunk(fh, chunk)
                        bar.update(len(chunk))
                except urllib3.exceptions.HTTPError as exc:  # cut short, read timeout
                    raise _Interrupted(f"{type(exc).__name__} after {fh.tell()} bytes") from exc
    os.replace(part, output_file)


def _disk_error(exc: OSError, path: Path) -> DownloadError:
    """Disk full gets its own message (with the free space); any other OS error names the file."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError(f"Could not write {path}: {exc.strerror or exc}")
    from tqdm import tqdm

    try:
        free = tqdm.format_sizeof(shutil.disk_usage(path.parent).free, "B", 1024)
    except OSError:
        free = "unknown"
    return DownloadError(
        f"Not enough disk space writing {path} (no space left on device; free: {free}).\n"
        "Free some space (or choose another --root / --cache-dir) and run again."
    )


def _download_error(
    exc: _Interrupted | ValueError | OSError, url: str, part: Path, timeout: float
) -> DownloadError:
    """What requests, pooch or the disk raised, as a DownloadError that says which URL and what failed."""
    import requests

    if isinstance(exc, _Interrupted):
        return DownloadError(
            f"Download of {url} was interrupted ({exc}).\n"
            f"The partial file {part} is kept: run the same command again to resume."
        )
    if isinstance(exc, requests.HTTPError):
        code, hint = exc.response.status_code, ""
        if code == 404:
            hint = "The file is not (or no longer) at that address."
        elif code in (401, 403):
            hint = "The server refused access (it may require a login or a browser); download it by hand."
        elif code == 429 or code >= 500:
            hint = "The server is busy or failing; try again later (a partial download is kept and resumes)."
        hint = f"\n{hint}" if hint else ""
        return DownloadError(f"Download failed: HTTP {code} {exc.response.reason} for {url}.{hint}")
    if isinstance(exc, requests.RequestException):
        reason = getattr(exc.args[0], "reason", exc.args[0]) if exc.args else exc  # urllib3's cause
        what = f"timed out after {timeout:g} s" if isinstance(exc, requests.Timeout) else str(reason)
        return DownloadError(
            f"Could not connect to download {url} ({what}).\n"
            "Check the network connection (and any proxy settings), or fetch the file by hand."
        )
    if isinstance(exc, ValueError):  # pooch: the hash does not match (it deleted the file)
        return DownloadError(f"Checksum mismatch for {url}: {exc}\nRun again to download it afresh.")
    return _disk_error(exc, Path(exc.filename or part))


def download_file(
    url: str,
    dest: str | Path,
    *,
    known_hash: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    retries: int = 3,
    retry_wait: float = 2.0,
) -> Path:
    """Download ``url`` to ``dest`` with pooch; only a complete file that matches ``known_hash`` lands there.

    ``known_hash`` is pooch's ``"md5:..."`` / ``"sha256:..."``; a matching ``dest`` (any, without a hash)
    is returned without network access. A cut transfer is retried ``retries`` times, resuming ``dest.part``.
    """
    import pooch

    dest = Path(dest)
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError(f"Refusing to download {url!r}: only http(s) URLs are supported.")
    part = dest.with_name(dest.name + ".part")
    store = pooch.create(
        path=dest.parent, base_url="", registry={dest.name: known_hash}, urls={dest.name: url}
    )
    downloader = partial(_resuming_download, part=part, progress=progress, timeout=timeout)
    pooch.get_logger().setLevel(logging.WARNING)  # our own messages say what is downloaded where
    attempt = 0
    while True:
        try:
            return Path(store.fetch(dest.name, downloader=downloader))
        except (_Interrupted, ValueError, OSError) as exc:
            if not isinstance(exc, _Interrupted) or attempt == retries:  # offline: say so at once
                raise _download_error(exc, url, part, timeout) from None
        attempt += 1
        time.sleep(retry_wait * attempt)


# --------------------------------------------------------------------------------------------- layout


def _visible_files(directory: Path) -> Iterator[Path]:
    """Non-hidden files directly in ``directory``; none when it is missing or unreadable."""
    with suppress(OSError):
        yield from (p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def dataset_present(root: str | Path) -> bool:
    """True when ``root/train/NORMAL`` and ``root/train/PNEUMONIA`` exist and each holds a file."""
    return all(any(_visible_files(Path(root) / "train" / name)) for name in CLASSES)


def count_images(root: Path) -> dict[str, dict[str, int]]:
    return {
        split: {name: sum(1 for _ in _visible_files(root / split / name)) for name in CLASSES}
        for split in ("train", "val", "test")
        if (root / split).is_dir()
    }


@contextmanager
def _staging(root: Path, tag: str) -> Iterator[Path]:
    """A temporary sibling of ``root`` to build the dataset in, removed afterwards whatever happens."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.{tag}-", dir=root.parent))
    except OSError as exc:
        raise _disk_error(exc, root) from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _is_junk(name: str) -> bool:
    """macOS and Windows debris in the archive (``__MACOSX/``, ``._*``, ``.DS_Store``, ``Thumbs.db``)."""
    parts = PurePosixPath(name).parts
    return "__MACOSX" in parts or (bool(parts) and (parts[-1] in _JUNK_NAMES or parts[-1].startswith("._")))


def _find_dataset_dir(base: Path, max_depth: int = 4) -> Path | None:
    """The directory under ``base`` (archives nest it) whose train/NORMAL and train/PNEUMONIA hold the
    most files; ties go to the shallowest."""
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

    OS junk is skipped; ``ZipFile.extract`` drops absolute prefixes and ``..`` (no zip-slip). On failure
    ``root`` is left as it was.
    """
    zip_path, root = Path(zip_path), Path(root)
    with _hint_root(root):
        try:
            zf = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise _CorruptArchiveError(
                f"{zip_path} is not a valid zip archive (truncated or corrupt download?): {exc}"
            ) from None
        with zf, _staging(root, "extract") as tmp:
            for info in zf.infolist():
                if not _is_junk(info.filename):
                    _extract_member(zf, info, tmp, zip_path)
            found = _find_dataset_dir(tmp)
            if found is None or not dataset_present(found):
                raise DownloadError(
                    f"{zip_path} does not contain the expected layout: no folder with non-empty "
                    "train/NORMAL and train/PNEUMONIA (expected e.g. chest_xray/train/NORMAL)."
                )
            _install(found, root)
    return root


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, tmp: Path, zip_path: Path) -> None:
    """One member into ``tmp``; its CRC is checked as it is read (a corrupt member raises)."""
    try:
        zf.extract(info, tmp)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
        raise _CorruptArchiveError(
            f"{zip_path} is corrupt at member {info.filename!r} ({exc}); delete it and download again."
        ) from None
    except OSError as exc:
        raise _disk_error(exc, Path(exc.filename or tmp)) from None


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
    """Write a MedMNIST PneumoniaMNIST ``.npz`` as ``root/{train,val,test}/CLASS/pmnist_<split>_<NNNNN>.png``.

    The official ``val/`` is kept: the images carry no patient ids, so a validation set carved from
    train may put films of one patient on both sides.
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
        with data, _staging(root, "convert") as tmp:
            for split in ("train", "val", "test"):
                if not _write_pmnist_split(data, split, tmp, npz_path) and split == "train":
                    raise DownloadError(f"{npz_path} has no train_images/train_labels arrays.")
            if not dataset_present(tmp):
                raise DownloadError(f"{npz_path}: the training split lacks one of the classes {CLASSES}.")
            _install(tmp, root)
    return root


# --------------------------------------------------------------------------------------------- dataset


def _known_hash(md5: str | None, sha256: str | None) -> str | None:
    """pooch's form of the digest to check: the sha256 when there is one, else the md5, else none."""
    return f"sha256:{sha256}" if sha256 else f"md5:{md5}" if md5 else None


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

    The download stays in ``cache_dir`` (default ``root.parent / ".downloads"``) until unpacked, so an
    interrupted run resumes. ``url``/``md5``/``sha256`` override the source's (mirrors, tests).
    """
    root = Path(root).expanduser()
    if dataset_present(root):
        return root
    spec = get_source(source)
    with _hint_root(root):
        cache = Path(cache_dir).expanduser() if cache_dir is not None else root.parent / DEFAULT_CACHE_DIRNAME
        archive = cache / spec.filename_for(size)
        download_file(
            url or spec.url_for(size),
            archive,
            known_hash=_known_hash(md5, sha256) or _known_hash(spec.md5_for(size), spec.sha256_for(size)),
            progress=progress,
            timeout=timeout,
            retries=retries,
            retry_wait=retry_wait,
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


def ask(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def stdin_is_tty() -> bool:
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
    """Return ``root`` when it holds the dataset; otherwise download it (``download=True``, extra keyword
    arguments go to :func:`download_dataset`), ask at a terminal (``interactive``, default: stdin is a
    tty), or raise :class:`DatasetNotFoundError` naming ROOT and the download command."""
    root = Path(root).expanduser()
    if dataset_present(root):
        return root
    spec = get_source(source)
    if not download:
        if interactive is None:
            interactive = stdin_is_tty()
        if not interactive:
            raise DatasetNotFoundError(root)
        if not ask(f"Dataset not found at {root}. Download {spec.describe(size)} to {root}? [y/N] "):
            raise DatasetNotFoundError(root, "Download declined.")
    return download_dataset(root, source, size, **download_kwargs)


if __name__ == "__main__":  # the former name of ``python -m xray.download``, kept working
    runpy.run_module("xray.download", run_name="__main__", alter_sys=True)
