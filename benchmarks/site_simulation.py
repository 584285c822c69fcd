"""Simulated sites: how a site profile fitted on k labelled films does on the rest of the site.

    python benchmarks/site_simulation.py logs/train/multiruns/<timestamp> --out site_simulation.md
    python benchmarks/site_simulation.py --synthetic /tmp/site_runs --out site_simulation.md

Every (fold, shift) of k fold runs is one site: the fold's out-of-fold predictions, clean
(``val_predictions.csv``) or under one acquisition shift (``val_shift_predictions.csv``), never seen
by the model that scored them. Each site is resampled to each prevalence (one class thinned); then,
for each k, ``--draws`` samples of k labelled films (k = 0: ``--unlabelled`` unlabelled films, the
prevalence only) each fit a profile (``xray.evaluation.site.fit_batch``, the rule ``python -m xray.site``
uses) and are scored on the rest of that site, with and without the profile. The model is the fold
ensemble as ``python -m xray.cv`` ships it: temperature and threshold fitted on the pooled clean
out-of-fold logits (``--threshold-rule``, default ``shift_youden`` when the runs have shift
predictions), reference prevalence their PNEUMONIA share, reference score distribution (what
``ensemble.json`` stores as ``reference_scores``: the per-class histogram of those logits, against which
unlabelled films are checked before EM may read them as a prevalence).

``--synthetic DIR`` first writes five synthetic fold runs (binormal logits shaped like the shipped
model's out-of-fold ones, AUROC ~0.998, and 14 synthetic shifts: translations, scalings, noise, a
NORMAL subgroup over-called, a PNEUMONIA subgroup missed, a test-split-like site and a site the model
does not fit) and simulates those: a check of the machinery, not a measurement of any model.
Seeded throughout; about a minute per 1,000 films x 15 sites x 3 prevalences x 5 k on two cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from xray.evaluation.calibration import fit_temperature
from xray.evaluation.folds import FoldRun, find_fold_runs
from xray.evaluation.metrics import choose_threshold
from xray.evaluation.shifts import shift_youden_threshold
from xray.evaluation.site import (
    ALPHA,
    ModelReference,
    ReferenceScores,
    render_simulation_table,
    resample_to_prevalence,
    rule_of,
    simulate_site,
    summarise_simulation,
    worse,
)

# ------------------------------------------------------------------------------------ synthetic runs
SEPARATION = 2.03  # class means at +-m of a unit-variance latent: AUROC 0.998, as the shipped model's OOF
SYNTHETIC_TEMPERATURE = 0.58  # raw logits are under-confident by this factor, as the shipped ensemble's
_LATENT = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def _replace(
    x: torch.Tensor, pick: torch.Tensor, mean: float, g: torch.Generator, share: float, sd: float = 1.0
) -> torch.Tensor:
    """A ``share`` of the films in ``pick`` moved to N(mean, sd): a subgroup the model misreads."""
    chosen = pick & (torch.rand(x.shape, generator=g, dtype=torch.float64) < share)
    return torch.where(chosen, mean + sd * torch.randn(x.shape, generator=g, dtype=torch.float64), x)


def _noise(x: torch.Tensor, sd: float, g: torch.Generator) -> torch.Tensor:
    return x + sd * torch.randn(x.shape, generator=g, dtype=torch.float64)


SYNTHETIC_SHIFTS: dict[str, _LATENT] = {
    "brighter": lambda x, y, g: x + 0.6,
    "brighter_overcall": lambda x, y, g: _replace(x + 0.3, y == 0, 1.0, g, 0.08),
    "darker": lambda x, y, g: x - 0.6,
    "sharper": lambda x, y, g: 1.3 * x,
    "softer": lambda x, y, g: 0.75 * x,
    "blur": lambda x, y, g: _noise(0.85 * x, 0.4, g),
    "noise": lambda x, y, g: _noise(x, 0.6, g),
    "jpeg": lambda x, y, g: _noise(x + 0.25, 0.25, g),
    "mixed": lambda x, y, g: 1.2 * x - 0.4,
    "normal_overcall": lambda x, y, g: _replace(x, y == 0, 1.0, g, 0.12),
    "pneumonia_miss": lambda x, y, g: _replace(x, y == 1, -1.0, g, 0.12),
    "overcall_cluster": lambda x, y, g: _replace(x + 0.5, y == 0, 1.4, g, 0.15),
    "test_like": lambda x, y, g: _replace(torch.where(y == 1, x + 0.8, x), y == 0, 0.9, g, 0.18, sd=0.7),
    "weak": lambda x, y, g: _noise(0.4 * x, 0.8, g),
}
"""Synthetic shifts of the latent score: translations and scalings (exposure, processing), noise (blur,
compression), subgroups the model misreads (over-called NORMAL films with burned-in text; missed
PNEUMONIA), a site shaped like the official test split as measured (PNEUMONIA films clearer, a fifth
of the NORMAL films over-called: sensitivity ~0.997 and specificity ~0.82 at the stored threshold,
and a threshold that gives ~0.95 accuracy and ~0.92 specificity) and one the model does not fit
(AUROC ~0.90)."""


def _latent_logits(x: torch.Tensor, reference: float) -> torch.Tensor:
    """Raw logits of a latent score: the binormal log likelihood ratio plus the prior log-odds, times T."""
    return SYNTHETIC_TEMPERATURE * (2 * SEPARATION * x + math.log(reference / (1 - reference)))


def write_synthetic_runs(
    root: Path, n_folds: int = 5, per_fold: int = 1043, prevalence: float = 0.743, seed: int = 0
) -> Path:
    """Fold run directories under ``root`` as ``train.py`` writes them (the files ``xray.cv`` reads)."""
    root.mkdir(parents=True, exist_ok=True)
    for fold in range(n_folds):
        g = torch.Generator().manual_seed(1000 * seed + fold)
        y = (torch.rand(per_fold, generator=g) < prevalence).long()
        x = (2 * y - 1).double() * SEPARATION + torch.randn(per_fold, generator=g, dtype=torch.float64)
        run = root / f"fold{fold}"
        run.mkdir(exist_ok=True)
        z = _latent_logits(x, prevalence)
        lines = ["path,label,logit,prob"] + [
            f"/synthetic/{'PNEUMONIA' if int(c) else 'NORMAL'}/f{fold}_{i:05d}.png,{int(c)},{float(v)!r},"
            f"{float(torch.sigmoid(v / SYNTHETIC_TEMPERATURE))!r}"
            for i, (c, v) in enumerate(zip(y, z, strict=True))
        ]
        (run / "val_predictions.csv").write_text("\n".join(lines) + "\n")
        shifted = ["shift,label,logit"] + [
            f"clean,{int(c)},{float(v):.6g}" for c, v in zip(y, z, strict=True)
        ]
        for k, (name, shift) in enumerate(SYNTHETIC_SHIFTS.items()):
            gs = torch.Generator().manual_seed(1000 * seed + 100 * fold + k)
            zs = _latent_logits(shift(x, y, gs), prevalence)
            shifted += [f"{name},{int(c)},{float(v):.6g}" for c, v in zip(y, zs, strict=True)]
        (run / "val_shift_predictions.csv").write_text("\n".join(shifted) + "\n")
        metrics = {"fold": fold, "n_folds": n_folds, "threshold": 0.5, "temperature": SYNTHETIC_TEMPERATURE}
        (run / "metrics.json").write_text(json.dumps(metrics) + "\n")
    return root


# -------------------------------------------------------------------------------------------- model
def model_of(
    runs: Sequence[FoldRun], rule: str | None = None, **override: float | None
) -> tuple[ModelReference, str]:
    """The fold ensemble as ``xray.cv`` ships it: pooled temperature, threshold by ``rule`` (shift_youden
    when every run has shift predictions), reference prevalence = the pooled PNEUMONIA share."""
    logits = torch.cat([r.predictions.logits for r in runs])
    labels = torch.cat([r.predictions.labels for r in runs])
    has_shifts = all(r.shifted for r in runs)
    rule = rule or ("shift_youden" if has_shifts else "youden")
    temperature = override.get("temperature") or fit_temperature(logits, labels)
    if override.get("threshold") is not None:
        threshold = float(override["threshold"])  # type: ignore[arg-type]
    elif rule == "shift_youden":
        if not has_shifts:
            raise SystemExit(
                "error: --threshold-rule shift_youden needs every run's val_shift_predictions.csv"
            )
        shift_labels = torch.cat([r.shifted[next(iter(r.shifted))][0] for r in runs])  # type: ignore[index]
        by_shift = {
            name: torch.cat([r.shifted[name][1] for r in runs])  # type: ignore[index]
            for name in runs[0].shifted  # type: ignore[union-attr]
        }
        threshold = shift_youden_threshold(by_shift, shift_labels, temperature)
    else:
        threshold = choose_threshold(torch.sigmoid(logits / temperature), labels, rule=rule)
    reference = override.get("reference_prevalence") or float(labels.double().mean())
    scores = ReferenceScores.from_logits(logits, labels, float(temperature))
    model = ModelReference(float(temperature), float(threshold), float(reference), rule_of(rule), scores)
    return model, rule


def sites_of(runs: Sequence[FoldRun]) -> list[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(shift, fold, raw logits, labels) of every site: each run clean, then under each of its shifts."""
    sites = []
    for run in runs:
        sites.append(("clean", run.fold, run.predictions.logits, run.predictions.labels))
        for name, (labels, logits) in (run.shifted or {}).items():
            if name != "clean":
                sites.append((name, run.fold, logits.double(), labels))
    return sites


def _seed(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def simulate(
    runs: Sequence[FoldRun],
    model: ModelReference,
    ks: Sequence[int],
    prevalences: Sequence[float],
    draws: int,
    unlabelled: int,
    alpha: float,
    seed: int,
) -> tuple[dict[tuple[float, int], list[dict[str, Any]]], dict[tuple[str, float, int], list[dict[str, Any]]]]:
    """Every (site, prevalence, k): per-draw scores with and without the profile; pooled by (prevalence, k)
    and by (shift, prevalence, k)."""
    cells: dict[tuple[float, int], list[dict[str, Any]]] = {}
    by_shift: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for shift, fold, logits, labels in sites_of(runs):
        for prevalence in prevalences:
            gen = torch.Generator().manual_seed(_seed(seed, shift, fold, prevalence))
            idx = resample_to_prevalence(labels, prevalence, gen)
            z, y = logits[idx], labels[idx]
            for k in ks:
                if k > z.numel() - 20:
                    print(
                        f"skipped: fold {fold} {shift} at prevalence {prevalence}: {z.numel()} films, too few "
                        f"for k = {k} and a rest of 20 to score",
                        file=sys.stderr,
                    )
                    continue
                gen = torch.Generator().manual_seed(_seed(seed, shift, fold, prevalence, k))
                result = simulate_site(z, y, model, k, draws, gen, unlabelled=unlabelled, alpha=alpha)
                cells.setdefault((prevalence, k), []).append(result)
                by_shift.setdefault((shift, prevalence, k), []).append(result)
    return cells, by_shift


def _shift_table(by_shift: dict[tuple[str, float, int], list[dict[str, Any]]], k: int) -> str:
    """Medians per shift at one k: model -> profile, pooled over folds."""
    lines = [
        f"Per shift at k = {k} (medians over folds and draws, without → with the profile):",
        "",
        "| shift | prevalence | accuracy | specificity | sensitivity | log loss | folds worse (acc/spec/LL) | changed (calib) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (shift, prevalence, kk), sites in sorted(
        by_shift.items(), key=lambda item: (item[0][0] != "clean", item[0])
    ):
        if kk != k:
            continue
        cells = []
        for metric in ("accuracy", "specificity", "sensitivity", "log_loss"):
            pair = [torch.cat([s[w][metric] for s in sites]) for w in ("model", "profile")]
            cells.append(" → ".join(f"{float(v[v.isfinite()].median()):.3f}" for v in pair))
        folds_worse = "/".join(
            str(sum(float(worse(m, s["profile"][m], s["model"][m]).double().mean()) > 0.10 for s in sites))
            for m in ("accuracy", "specificity", "log_loss")
        )
        changed = float(torch.cat([s["changed"]["calibration"] for s in sites]).double().mean())
        lines.append(
            f"| {shift} | {prevalence:.2f} | {' | '.join(cells)} | {folds_worse} | {100 * changed:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="site_simulation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dirs", nargs="*", metavar="DIR", help="fold runs: a multirun folder or run directories"
    )
    parser.add_argument(
        "--synthetic", type=Path, help="write synthetic fold runs into this folder and simulate them"
    )
    parser.add_argument("--synthetic-seed", type=int, default=0)
    parser.add_argument("--synthetic-films", type=int, default=1043, help="films per synthetic fold")
    parser.add_argument("--out", type=Path, default=Path("site_simulation.md"), help="markdown table")
    parser.add_argument("--json", type=Path, help="also the rows as JSON")
    parser.add_argument("--draws", type=int, default=200, help="draws per site, prevalence and k")
    parser.add_argument("--ks", default="0,10,20,50,100", help="labelled films per draw (0: unlabelled only)")
    parser.add_argument("--prevalences", default="0.10,0.40,0.74")
    parser.add_argument("--unlabelled", type=int, default=100, help="unlabelled films per draw at k = 0")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="level of the keep-unless-shown tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--by-shift-k", type=int, default=50, help="the k of the per-shift table")
    parser.add_argument("--threshold-rule", choices=("shift_youden", "youden", "sensitivity", "fixed"))
    parser.add_argument(
        "--temperature", type=float, help="the model's temperature (default: fitted on the runs)"
    )
    parser.add_argument("--threshold", type=float, help="the model's threshold (default: by the rule)")
    parser.add_argument("--reference-prevalence", type=float, help="default: the runs' PNEUMONIA share")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    dirs = list(args.dirs)
    if args.synthetic is not None:
        write_synthetic_runs(args.synthetic, per_fold=args.synthetic_films, seed=args.synthetic_seed)
        dirs.append(str(args.synthetic))
    if not dirs:
        parser.error("give fold run directories or --synthetic DIR")
    ks = [int(v) for v in _floats(args.ks)]
    prevalences = _floats(args.prevalences)
    runs = find_fold_runs(dirs)
    model, rule = model_of(
        runs,
        args.threshold_rule,
        temperature=args.temperature,
        threshold=args.threshold,
        reference_prevalence=args.reference_prevalence,
    )
    cells, by_shift = simulate(
        runs, model, ks, prevalences, args.draws, args.unlabelled, args.alpha, args.seed
    )
    rows = summarise_simulation(cells)
    n_sites = len(sites_of(runs))
    source = (
        f"synthetic (seed {args.synthetic_seed})"
        if args.synthetic is not None and not args.dirs
        else ", ".join(dirs)
    )
    text = [
        "# Site profile simulation",
        "",
        f"Fold runs: {source}; {len(runs)} folds, {n_sites} sites (fold x shift), "
        f"{sum(r.predictions.labels.numel() for r in runs)} out-of-fold films.",
        f"Model: temperature {model.temperature:.4f}, threshold {model.threshold:.4f} ({rule}), reference "
        f"prevalence {model.reference_prevalence:.3f}. Tests at level {args.alpha}; seed {args.seed}.",
        "",
        render_simulation_table(rows, args.draws, args.unlabelled),
    ]
    if args.by_shift_k in ks:
        text.append(_shift_table(by_shift, args.by_shift_k))
    elapsed = time.perf_counter() - start
    text.append(f"Run time {elapsed:.0f} s.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text), encoding="utf-8")
    if args.json is not None:
        payload = {
            "model": {**model.__dict__, "reference_scores": model.reference_scores.to_json()},  # type: ignore[union-attr]
            "rule": rule,
            "draws": args.draws,
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    print("\n".join(text))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
