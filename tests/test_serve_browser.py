"""The page at ``GET /`` in a real headless browser: Debian's Chromium driven by Playwright, against
``serve.py ckpt=pretrained`` on a free loopback port. A film chosen and one dropped are shown with the
probability, the label at the stored threshold, the warnings in plain words and the Grad-CAM overlay;
a bad file gets its reason. ``XRAY_PAGE_SCREENSHOT=PATH`` keeps the page's screenshot there (the
README's docs/images/serve-page.png is made that way).
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REAL_DATA, synthetic_xray
from tests.test_serve import post_url, serve_process

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the dev extra)")

CHROMIUM = next(
    (
        found
        for found in (
            os.environ.get("XRAY_CHROMIUM"),
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
        )
        if found and Path(found).exists()
    ),
    None,
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium: apt-get install chromium (Playwright's own browser download is not used)",
    ),
]


def _films(folder: Path) -> tuple[Path, Path]:
    """A real NORMAL and a real PNEUMONIA film from the validation split, else synthetic ones."""
    real = [sorted((REAL_DATA / "val" / c).glob("*.jpeg")) for c in ("NORMAL", "PNEUMONIA")]
    if all(real):
        return real[0][0], real[1][0]
    rng = np.random.default_rng(3)
    paths = []
    for label in (0, 1):
        path = folder / f"synthetic_{label}.png"
        Image.fromarray(synthetic_xray(label, 256, rng)).save(path)
        paths.append(path)
    return paths[0], paths[1]


def _drop(page, path: Path) -> None:
    """A file dropped on the drop zone, as a user drags one from the desktop."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name));
            return transfer;
        }""",
        [path.name, data],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def _wait_for_answer(page, name: str) -> None:
    page.wait_for_function(
        "(name) => !document.getElementById('result').hidden && document.getElementById('name').textContent === name"
        " && document.getElementById('gradcam').naturalWidth > 0",
        arg=name,
        timeout=120_000,
    )


def test_the_page_shows_a_dropped_film_with_its_answer_and_heat_map(tmp_path: Path) -> None:
    normal, pneumonia = _films(tmp_path)
    small = tmp_path / "thumbnail.png"
    Image.fromarray(synthetic_xray(0, 40, np.random.default_rng(1))).save(small)
    bad = tmp_path / "saved_page.jpg"
    bad.write_bytes(b"<!doctype html><html><body>not a film</body></html>")

    with serve_process(["ckpt=pretrained", "max_batch_size=4"], tmp_path) as (url, _):
        expected = {p.name: post_url(url, p.read_bytes())[1] for p in (normal, pneumonia)}
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                outside = []
                page.on(
                    "request",
                    lambda r: (
                        outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None
                    ),
                )
                page.goto(url + "/")
                assert page.inner_text("#notice") == "Research use, not a medical device."

                page.set_input_files("#file", str(normal))  # choose a file
                _wait_for_answer(page, normal.name)
                answer = expected[normal.name]
                assert page.inner_text("#prob") == f"{answer['prob_pneumonia']:.3f}"
                assert page.inner_text("#label") == answer["label"]
                assert page.inner_text("#threshold") == f"{answer['threshold']:.3f}"
                assert page.evaluate("document.getElementById('film').naturalWidth") > 0
                assert "research use, not a medical device" in page.inner_text("body").lower()
                screenshot = tmp_path / "serve-page.png"
                page.screenshot(path=str(screenshot), full_page=True)

                _drop(page, pneumonia)  # drop a file
                _wait_for_answer(page, pneumonia.name)
                assert page.inner_text("#prob") == f"{expected[pneumonia.name]['prob_pneumonia']:.3f}"
                assert page.inner_text("#label") == expected[pneumonia.name]["label"]

                page.set_input_files("#file", str(small))
                _wait_for_answer(page, small.name)
                warnings = page.locator("#warnings li[data-kind='small']")
                assert "very small" in warnings.inner_text()

                page.set_input_files("#file", str(bad))
                page.wait_for_selector("#error:not([hidden])", timeout=60_000)
                assert "not an image" in page.inner_text("#error") and "415" in page.inner_text("#error")
                assert outside == [], "the page fetched something from elsewhere"
            finally:
                browser.close()
    keep = os.environ.get("XRAY_PAGE_SCREENSHOT")
    if keep:
        shutil.copyfile(screenshot, keep)
