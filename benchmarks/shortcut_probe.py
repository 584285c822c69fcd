"""Shortcut probe: how much of the label the acquisition look alone predicts on the Kermany training split.

    python benchmarks/shortcut_probe.py --root ../shared/data/chest_xray --json shortcut_probe.json
    python benchmarks/shortcut_probe.py --root ../shared/data/chest_xray --variants silhouette --folds 3
    python benchmarks/shortcut_probe.py --root ../shared/data/chest_xray --limit-per-class 300 --epochs 2

Reads ``ROOT/train`` as training does (``xray.data.records.scan_split``; each film through the eval
preset ``load_resized``: grayscale uint8, 224 px, where the cue rules were tuned) and prints a markdown
report (``--json PATH`` writes the numbers):

1. the cue table: per class the mean, quartiles and share > 0 of each statistic of
   ``xray.evaluation.cues`` and its single-cue AUROC, and the tails where the cues act;
2. the probe, on the project's patient-grouped, class-stratified folds (``patient_folds``, the folds
   of ``data.n_folds=5`` with split seed 42): (a) a logistic regression on the cue statistics;
   (b) a small CNN on films of which only a part is visible (``VARIANTS``). Pooled out-of-fold AUROC and
   the spread over folds.

The border and edge variants are upper bounds of the acquisition shortcut: their band still shows
anatomy (lung apices, lateral lung, the chest wall). The silhouette, which shows only the air around
the body, is the closest to acquisition alone. Seeded throughout; one thread by default, so the numbers
repeat. The whole split (5,216 films, 3 variants, 5 epochs) takes roughly 15-20 minutes on one core,
about 5 of them per CNN variant; ``--limit-per-class 300 --epochs 2`` about a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xray.core.constants import CLASSES
from xray.core.errors import UserError
from xray.data.io import ImageReadError
from xray.data.records import Record, patient_folds, scan_split
from xray.data.transforms import load_resized
from xray.evaluation import cues
from xray.evaluation.cues import CUES, auroc, cue_values, summarise_cues

CUE_SIZE = 224
"""Films are measured at 224 px: the cue rules' pixel sizes were tuned there."""
BATCH = 256
"""Films per cue batch (the cue intermediates take ~40 bytes per pixel)."""
VARIANTS = ("border", "edge", "silhouette", "centre")
HIDDEN_CENTRE = {"border": 0.6, "edge": 0.8, "centre": 0.6}
"""Side of the central square, as a fraction of the film's: hidden for border/edge, kept for centre."""
TAILS: tuple[tuple[str, str, Callable[[Tensor], Tensor]], ...] = (
    ("body_fraction", ">= 0.97 (body touches all edges)", lambda v: v >= 0.97),
    ("top_corner_background", "== 0 (no air in the top corners)", lambda v: v == 0),
    ("marker_area", ">= 0.002 (big letter, >= ~100 px)", lambda v: v >= 0.002),
    ("text_score", "> 0 (burned-in text found)", lambda v: v > 0),
)
"""Where the cues act: rare values, far more common in PNEUMONIA films."""
CUE_FORMAT = dict(zip(CUES, (".3f", ".3f", ".5f", ".2f"), strict=True))
FEATURES = ("marker found", "log marker px", "text found")
"""Indicator and log views of the tail-heavy cues, added to the four statistics for the regression."""
FEATURE_GROUPS = dict(zip(CUES, ([0], [1], [2, 4, 5], [3, 6]), strict=True))
"""The regression's columns that come from each cue (for the one-cue rows)."""


class ProbeInputError(UserError, ValueError):
    """An argument or dataset the probe cannot use; reported as one ``error:`` line, exit code 2."""


# ----------------------------------------------------------------------------------------- data
def select(records: list[Record], per_class: int | None, seed: int) -> list[int]:
    """Indices of the films to use: all, or a seeded sample of ``per_class`` per class. The folds are
    assigned on the whole split first, so a quick run keeps each film in the fold training gives it."""
    if per_class is None:
        return list(range(len(records)))
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in range(len(CLASSES)):
        members = np.array([i for i, r in enumerate(records) if r.label == label], dtype=np.int64)
        keep += members[rng.permutation(len(members))[:per_class]].tolist()
    return sorted(keep)


def measure(
    paths: Sequence[Path], size: int, silhouette: bool
) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """Cue values per film, the CNN's ``(N, 1, size, size)`` input in [0, 1] and, for the silhouette,
    which of its cells hold no body pixel. One batch of 224 px films at a time: they are never all held.

    The CNN input is the 224 px film average-pooled to ``size``, so each of its pixels is exactly the
    cell the silhouette mask tests: no body pixel leaks into a cell shown as air."""
    parts: list[dict[str, Tensor]] = []
    small: list[Tensor] = []
    air: list[Tensor] = []
    for start in range(0, len(paths), BATCH):
        batch = [load_resized(p, CUE_SIZE, "bilinear") for p in paths[start : start + BATCH]]
        films = torch.from_numpy(np.stack(batch))[:, None]  # (B, 1, 224, 224) uint8, as training's cache
        parts.append(cue_values(films))
        small.append(F.adaptive_avg_pool2d(films.float() / 255, size))
        if silhouette:  # body_fraction's own background (dark pixels connected to the frame border);
            # cues has no public per-pixel mask, and a second flood fill here could drift from it
            body = torch.from_numpy(~cues._Films(films).background)[:, None].float()
            air.append(F.adaptive_max_pool2d(body, size) == 0)
        print(f"  read and measured {min(start + BATCH, len(paths))}/{len(paths)} films", file=sys.stderr)
    values = {cue: torch.cat([p[cue] for p in parts]) for cue in CUES}
    return values, torch.cat(small), torch.cat(air) if silhouette else None


# ------------------------------------------------------------------------------------ the probe
def out_of_fold(
    fit_predict: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
    y: np.ndarray,
    fold: np.ndarray,
    k: int,
    name: str,
) -> dict[str, Any]:
    """Each fold scored by a model fitted on the others: the AUROC of the pooled scores, and per fold with
    its min, max and sample sd (over folds where it is defined), since one pooled number hides the spread.
    Pooling ranks the fold models' scores together, so it also asks them to agree on a scale: models
    that learned little can pool below every fold's own AUROC."""
    scores = np.zeros(len(y))
    per_fold: list[float] = []
    t0 = time.perf_counter()
    for f in range(k):
        train, test = fold != f, fold == f
        if test.any():
            scores[test] = fit_predict(train, test, f)
        per_fold.append(auroc(torch.from_numpy(scores[test]), torch.from_numpy(y[test])))
        print(
            f"  {name} fold {f}: AUROC {per_fold[-1]:.3f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr
        )
    ok = [a for a in per_fold if math.isfinite(a)]
    return {
        "pooled": auroc(torch.from_numpy(scores), torch.from_numpy(y)),
        "folds": per_fold,
        "min": min(ok, default=math.nan),
        "max": max(ok, default=math.nan),
        "sd": statistics.stdev(ok) if len(ok) > 1 else math.nan,
        "seconds": time.perf_counter() - t0,
    }


def cue_features(values: dict[str, Tensor]) -> np.ndarray:
    """The four statistics, then whether a marker was found, log(1 + marker pixels at 224 px) and
    whether text was found: the marker and text cues are mostly 0 or a narrow mode plus a tail."""
    m, t = values["marker_area"].numpy(), values["text_score"].numpy()
    extra = [(m > 0) * 1.0, np.log(m * CUE_SIZE * CUE_SIZE + 1), (t > 0) * 1.0]
    return np.stack([values[c].numpy() for c in CUES] + extra, 1).astype(np.float64)


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 50) -> np.ndarray:
    """L2-penalised logistic regression by Newton's method, intercept first and not penalised: a handful
    of standardised features needs no solver library, and the fit is exact and repeatable."""
    design = np.column_stack([np.ones(len(x)), x])
    w = np.zeros(design.shape[1])
    penalty = np.full(design.shape[1], l2 * len(x))
    penalty[0] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-design @ w))
        grad = design.T @ (p - y) + penalty * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def logistic_probe(x: np.ndarray, y: np.ndarray, fold: np.ndarray, k: int, name: str) -> dict[str, Any]:
    """Out-of-fold logistic regression; features standardised on each training part."""

    def fit_predict(train: np.ndarray, test: np.ndarray, f: int) -> np.ndarray:
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-12
        w = logistic_fit((x[train] - mu) / sd, y[train].astype(np.float64))
        return np.column_stack([np.ones(int(test.sum())), (x[test] - mu) / sd]) @ w

    return out_of_fold(fit_predict, y, fold, k, name)


class SmallCNN(nn.Module):
    """Four 3x3 conv blocks (8-16-32-64 channels, BN, ReLU, 2x2 max-pool), global average pool, linear:
    small enough to train on every fold on a CPU, enough to find a look that separates the classes."""

    def __init__(self) -> None:
        super().__init__()
        chans = [1, 8, 16, 32, 64]
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)
                )
                for a, b in zip(chans[:-1], chans[1:], strict=True)
            ]
        )
        self.head = nn.Linear(chans[-1], 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).mean((2, 3))).squeeze(1)


def hidden(variant: str, size: int, air: Tensor | None) -> Tensor:
    """Where ``variant`` hides the film, broadcastable to ``(N, 1, size, size)``: border / edge the
    central 60% / 80% square, centre everything outside the central 60%, silhouette every cell that
    holds any body pixel (only the air around the body stays: its outline, marks on the air hidden too)."""
    if variant == "silhouette":
        assert air is not None
        return ~air
    lo, hi = round((1 - HIDDEN_CENTRE[variant]) / 2 * size), round((1 + HIDDEN_CENTRE[variant]) / 2 * size)
    centre = torch.zeros(size, size, dtype=torch.bool)
    centre[lo:hi, lo:hi] = True
    return ~centre if variant == "centre" else centre


def cnn_probe(
    images: Tensor, hide: Tensor, y: np.ndarray, fold: np.ndarray, k: int, epochs: int, seed: int, name: str
) -> dict[str, Any]:
    """Out-of-fold small CNN on ``images`` with ``hide`` set to each film's mean. The fill carries only
    the film's mean brightness, whose own AUROC the report gives (``film_mean_auroc``): near 0.5, the
    fill leaks next to nothing. Seeded per fold: the same films give the same numbers."""
    x = torch.where(hide, images.mean((2, 3), keepdim=True), images)
    target = torch.from_numpy(y).float()

    def fit_predict(train: np.ndarray, test: np.ndarray, f: int) -> np.ndarray:
        torch.manual_seed(seed + f)
        model = SmallCNN()
        xtr, ytr = x[torch.from_numpy(train)], target[torch.from_numpy(train)]
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        steps = epochs * -(-len(xtr) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        g = torch.Generator().manual_seed(seed + f)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(xtr), generator=g).split(64):
                loss = F.binary_cross_entropy_with_logits(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            return torch.cat([model(b) for b in x[torch.from_numpy(test)].split(256)]).numpy()

    result = out_of_fold(fit_predict, y, fold, k, name)
    return {**result, "visible_share": 1.0 - float(hide.expand_as(x).float().mean())}


# --------------------------------------------------------------------------------------- report
def tails(values: dict[str, Tensor], y: Tensor) -> list[dict[str, Any]]:
    """Share of each class past each ``TAILS`` threshold, and the share of PNEUMONIA among those films."""
    rows = []
    for cue, rule, past in TAILS:
        hit = past(values[cue])
        share = [float(hit[y == c].double().mean()) if (y == c).any() else math.nan for c in range(2)]
        among = float(y[hit].double().mean()) if hit.any() else math.nan
        counts = {"films": int(hit.sum()), "pneumonia_among": among}
        rows.append({"cue": cue, "past": rule, "NORMAL": share[0], "PNEUMONIA": share[1], **counts})
    return rows


def render(result: dict[str, Any]) -> str:
    """The markdown report."""
    n, table, s = result["n"], result["cue_table"], result["settings"]
    sample = f" (a seeded sample of {s['limit_per_class']} per class)" if s["limit_per_class"] else ""
    lines = [
        "# Acquisition shortcut probe",
        "",
        f"{s['root']}/train: {n['NORMAL']} NORMAL + {n['PNEUMONIA']} PNEUMONIA films{sample}, read as "
        f"training reads them and measured at {CUE_SIZE} px.",
        "",
    ]
    if sample:
        lines += [
            "A quick run: too few films for the CNN to learn much; its rows check the script, not the data.",
            "",
        ]
    lines += [
        "## Cue statistics",
        "",
        "AUROC: the statistic alone as a score for PNEUMONIA (below 0.5: higher for NORMAL). "
        "`> 0`: share of films with a non-zero value.",
        "",
        "| cue | class | mean | q1 | median | q3 | > 0 | AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cue in CUES:
        f = CUE_FORMAT[cue]
        for cls in ("NORMAL", "PNEUMONIA"):
            d = table[cue][cls]
            first = cls == "NORMAL"
            stats = " | ".join(format(d[key], f) for key in ("mean", "q1", "median", "q3"))
            auc = format(table[cue]["auroc"], ".3f") if first else ""
            lines.append(f"| {cue if first else ''} | {cls} | {stats} | {d['nonzero']:.3f} | {auc} |")
    total = n["NORMAL"] + n["PNEUMONIA"]
    lines += [
        "",
        "The cues act in the tails. Share of each class past a threshold, and of PNEUMONIA among the films "
        f"past it (among all films: {n['PNEUMONIA'] / total:.3f}):",
        "",
        "| cue | past | NORMAL | PNEUMONIA | films | PNEUMONIA among them |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {t['cue']} | {t['past']} | {t['NORMAL']:.3f} | {t['PNEUMONIA']:.3f} | {t['films']} | "
        f"{t['pneumonia_among']:.3f} |"
        for t in result["tails"]
    ]
    k = s["folds"]
    lines += [
        "",
        "## Shortcut probe",
        "",
        f"{k} patient-grouped, class-stratified folds of the whole split (`xray.data.records.patient_folds`, "
        f"seed {s['seed']}; films per fold {result['fold_sizes']}). Pooled out-of-fold AUROC; per fold "
        "min-max and sd.",
        "",
        "| model | input | visible | pooled AUROC | per fold (min-max) | sd |",
        "|---|---|---|---|---|---|",
    ]

    def row(model: str, what: str, r: dict[str, Any], visible: str = "") -> str:
        folds = f"{r['min']:.3f}-{r['max']:.3f}"
        return f"| {model} | {what} | {visible} | {r['pooled']:.3f} | {folds} | {r['sd']:.3f} |"

    if "lr" in result:
        lines.append(row("logistic regression", f"the 4 cues + {', '.join(FEATURES)}", result["lr"]))
        lines += [row("same, one cue", cue, r) for cue, r in result["lr_one_cue"].items()]
    described = {
        "border": "central 60% x 60% set to the film mean",
        "edge": "central 80% x 80% set to the film mean",
        "silhouette": "every cell holding body set to the mean: the body outline only",
        "centre": "outside the central 60% x 60% set to the mean (contrast)",
    }
    for variant, r in result.get("cnn", {}).items():
        lines.append(
            row(
                f"small CNN, {s['size']} px",
                f"{variant}: {described[variant]}",
                r,
                f"{r['visible_share']:.2f}",
            )
        )
    if result.get("cnn"):
        lines += [
            "",
            f"CNN: 4 conv blocks (8-16-32-64), AdamW, one-cycle lr 2e-3, batch 64, {s['epochs']} epoch(s), "
            f"no augmentation, {s['threads']} thread(s). Border and edge are upper bounds of the acquisition "
            "shortcut (the band still shows anatomy); the silhouette is the closest to acquisition alone. "
            f"The film mean, the value hidden cells get, alone has AUROC {result['film_mean_auroc']:.3f}.",
        ]
    return "\n".join(lines) + "\n"


def finite(obj: Any) -> Any:
    """``obj`` with every nan as None, so that ``--json`` writes strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ run
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--root", type=Path, required=True, help="the Kermany folder (chest_xray); reads ROOT/train"
    )
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--folds", type=int, default=5, help="patient-grouped folds (default 5)")
    ap.add_argument(
        "--seed", type=int, default=42, help="fold seed (training's split seed), sample and CNN seed"
    )
    ap.add_argument(
        "--variants",
        default="border,silhouette,centre",
        help=f"CNN variants, of {','.join(VARIANTS)}; '' for none",
    )
    ap.add_argument("--no-lr", action="store_true", help="skip the logistic regression")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="CNN input side in px (>= 16)")
    ap.add_argument("--limit-per-class", type=int, help="a seeded sample of N films per class (a quick run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: repeatable numbers)")
    a = ap.parse_args(argv)
    a.variants = [v for v in a.variants.split(",") if v]
    least = {"folds": 2, "epochs": 1, "size": 16, "threads": 1, "limit_per_class": 1}
    for name, low in least.items():
        value = getattr(a, name)
        if value is not None and value < low:
            ap.error(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if unknown := sorted(set(a.variants) - set(VARIANTS)):
        ap.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    return a


def probe(a: argparse.Namespace) -> dict[str, Any]:
    """Everything the report holds, as numbers."""
    torch.set_num_threads(a.threads)
    records = scan_split(a.root, "train")
    if len({r.patient for r in records}) < a.folds:
        raise ProbeInputError(f"{a.root}/train: fewer patients than --folds {a.folds}")
    all_folds = patient_folds(records, a.folds, a.seed)
    keep = select(records, a.limit_per_class, a.seed)
    fold = np.array([all_folds[i] for i in keep])
    y = np.array([records[i].label for i in keep], dtype=np.int64)
    values, images, air = measure([records[i].path for i in keep], a.size, "silhouette" in a.variants)
    labels = torch.from_numpy(y)
    result: dict[str, Any] = {
        "settings": {**{k: v for k, v in vars(a).items() if k not in ("root", "json")}, "root": str(a.root)},
        "n": {name: int((y == c).sum()) for c, name in enumerate(CLASSES)},
        "fold_sizes": np.bincount(fold, minlength=a.folds).tolist(),
        "fold_pneumonia_share": [
            float(y[fold == f].mean()) if (fold == f).any() else math.nan for f in range(a.folds)
        ],
        "cue_table": summarise_cues(values, labels),
        "tails": tails(values, labels),
        "film_mean_auroc": auroc(images.mean((1, 2, 3)), labels),
    }
    if not a.no_lr:
        x = cue_features(values)
        result["lr"] = logistic_probe(x, y, fold, a.folds, "logistic regression")
        result["lr_one_cue"] = {
            c: logistic_probe(x[:, cols], y, fold, a.folds, f"lr {c}") for c, cols in FEATURE_GROUPS.items()
        }
    result["cnn"] = {
        v: cnn_probe(images, hidden(v, a.size, air), y, fold, a.folds, a.epochs, a.seed, f"cnn {v}")
        for v in a.variants
    }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        result = probe(a)
    except (UserError, ImageReadError) as err:  # the data, not a bug: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(render(result), end="")
    if a.json:
        a.json.write_text(json.dumps(finite(result), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
