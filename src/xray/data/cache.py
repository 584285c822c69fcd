"""Decoded-image cache: every image decoded, made grayscale and resized once, then memory-mapped.

Steady-state epochs then read uint8 arrays instead of re-decoding JPEGs. A cache file is keyed by the
list of source files (path, size, mtime), the image size, the interpolation and the reader version,
so a changed dataset or setting builds a new one. Files are written to a temporary name and renamed
when complete: an interrupted build never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from xray.data.io import ImageReadError, read_image
from xray.transforms import resize_image

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when read_image or resize_image change what they produce."""


@dataclass
class DecodedCache:
    """A memory-mapped (N, S, S) uint8 array aligned with ``paths``; ``errors`` maps bad files to reasons."""

    array_path: Path
    paths: list[str]
    errors: dict[str, str]

    def open(self) -> np.ndarray:
        return np.load(self.array_path, mmap_mode="r")


def load_resized(path: str | Path, image_size: int, interpolation: str) -> np.ndarray:
    """The eval preset on one file: read_image then resize, as a (S, S) uint8 array."""
    return resize_image(read_image(path), image_size, interpolation)[0].numpy()


def _decode_one(args: tuple[str, int, str]) -> tuple[np.ndarray | None, str | None]:
    path, image_size, interpolation = args
    try:
        return load_resized(path, image_size, interpolation), None
    except ImageReadError as err:
        return None, err.reason


def cache_key(paths: Sequence[str | Path], image_size: int, interpolation: str) -> str:
    """Hash of the file list with sizes and mtimes, the settings and the cache version."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, image_size, interpolation]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{os.path.abspath(p)}|{stamp}\n".encode())
    return digest.hexdigest()[:24]


def build_cache(
    paths: Sequence[str | Path],
    image_size: int,
    interpolation: str,
    cache_dir: str | Path,
    num_workers: int = 0,
    progress: bool = True,
) -> DecodedCache:
    """Return the cache for these files, building it (in parallel, with a progress bar) if needed."""
    paths = [str(p) for p in paths]
    cache_dir = Path(cache_dir)
    key = cache_key(paths, image_size, interpolation)
    array_path = cache_dir / f"{key}-{image_size}px.npy"
    manifest_path = array_path.with_suffix(".json")
    if array_path.exists() and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("paths") == paths:
            return DecodedCache(array_path, paths, manifest.get("errors", {}))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_array = array_path.with_name(f"{array_path.stem}.{os.getpid()}.tmp.npy")
    array = np.lib.format.open_memmap(
        tmp_array, mode="w+", dtype=np.uint8, shape=(len(paths), image_size, image_size)
    )
    errors: dict[str, str] = {}
    jobs = [(p, image_size, interpolation) for p in paths]
    bar = tqdm(total=len(paths), desc=f"Caching {len(paths)} images at {image_size}px", disable=not progress)
    try:
        if num_workers > 0:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                results = pool.map(_decode_one, jobs, chunksize=32)
                _fill(array, paths, results, errors, bar)
        else:
            _fill(array, paths, map(_decode_one, jobs), errors, bar)
        array.flush()
        del array
        os.replace(tmp_array, array_path)
        tmp_manifest = manifest_path.with_name(
            f"{manifest_path.stem}.{os.getpid()}.json.tmp"
        )  # ranks build at once
        tmp_manifest.write_text(
            json.dumps(
                {
                    "version": CACHE_VERSION,
                    "image_size": image_size,
                    "interpolation": interpolation,
                    "paths": paths,
                    "errors": errors,
                }
            )
        )
        os.replace(tmp_manifest, manifest_path)
    finally:
        bar.close()
        if tmp_array.exists():
            tmp_array.unlink()
    log.info("Built decoded cache %s (%d images, %d unreadable)", array_path, len(paths), len(errors))
    return DecodedCache(array_path, paths, errors)


def _fill(array: np.ndarray, paths: list[str], results, errors: dict[str, str], bar) -> None:
    for i, (image, error) in enumerate(results):
        if error is not None:
            errors[paths[i]] = error
        else:
            array[i] = image
        bar.update(1)
