"""``python -m xray.cv DIR``: pool the out-of-fold predictions of k fold runs into ``cv_metrics.json``
and ``cv_report.md`` (in DIR or ``--out``); ``--ensemble-out`` writes the fold models as one ensemble;
``--reference-into FOLDER`` adds the runs' reference score distribution to an existing ensemble's
``ensemble.json`` (checkpoints untouched, nothing written beside the runs)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from xray.core.checkpoint_io import CheckpointError
from xray.evaluation.folds import (
    CV_THRESHOLD_RULES,
    CVError,
    FoldRun,
    aggregate,
    check_runs,
    find_fold_runs,
)
from xray.evaluation.report import fmt_num, write_cv_report
from xray.evaluation.shifts import TEMPERATURE_SOURCES
from xray.evaluation.site import ReferenceScores
from xray.inference.checkpoints import BEST_NAME, export_for_inference, load_model
from xray.inference.ood import manifest_section
from xray.inference.predictor import (
    MANIFEST_NAME,
    REFERENCE_KEY,
    read_ensemble_manifest,
    update_ensemble_manifest,
    write_ensemble_manifest,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xray.cv",
        description="Pool the out-of-fold validation predictions of k-fold runs into one report.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a multirun folder, or fold run directories")
    parser.add_argument("--out", type=Path, help="output folder (default: DIR when one is given)")
    parser.add_argument(
        "--ensemble-out",
        type=Path,
        help="also write the fold models as one ensemble (float16 copies + ensemble.json) into this folder",
    )
    parser.add_argument(
        "--threshold-rule",
        choices=CV_THRESHOLD_RULES,
        default="youden",
        help="shift_youden: Youden's J on the pooled shift-validation predictions (clean + shifted)",
    )
    parser.add_argument(
        "--target-sensitivity", type=float, default=0.95, help="for --threshold-rule sensitivity"
    )
    parser.add_argument(
        "--temperature-on",
        choices=TEMPERATURE_SOURCES,
        default="clean",
        help="shifts: fit the temperature on the pooled clean and shifted predictions (calibration that survives a shift)",
    )
    parser.add_argument(
        "--reference-into",
        type=Path,
        metavar="FOLDER",
        help="only add the runs' reference score distribution (per-class histogram of the calibrated clean "
        "out-of-fold logits, at the ensemble's temperature) to FOLDER/ensemble.json, whose members must be "
        "these runs' fold models; no report is written",
    )
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 (with one ``error:`` line on stderr) on a user error."""
    args = _parser().parse_args(argv)
    if args.reference_into is not None:
        return _reference_into(args)
    try:
        if args.out is None and len(args.dirs) != 1:
            raise CVError("--out is required when more than one DIR is given")
        out_dir = args.out if args.out is not None else Path(args.dirs[0])
        runs = find_fold_runs(args.dirs)
        result = aggregate(
            runs,
            threshold_rule=args.threshold_rule,
            target_sensitivity=args.target_sensitivity,
            n_bootstrap=args.n_bootstrap,
            seed=args.seed,
            temperature_on=args.temperature_on,
        )
        json_path, md_path = write_cv_report(result, out_dir)
        manifest = write_fold_ensemble(runs, result, args.ensemble_out) if args.ensemble_out else None
    except (CVError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the output folder cannot be written
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    m = result["pooled"]["at_threshold"]
    print(f"{len(runs)} of {result['n_folds']} folds, {result['n_images']} out-of-fold images")
    print(
        f"pooled @ {result['threshold']:.4f} ({result['threshold_rule']}): AUROC {fmt_num(m['auroc'])}, "
        f"accuracy {fmt_num(m['accuracy'])}, sensitivity {fmt_num(m['sensitivity'])}, "
        f"specificity {fmt_num(m['specificity'])}; temperature {fmt_num(result['temperature'])}"
    )
    print(f"wrote {md_path} and {json_path}")
    if manifest is not None:
        print(f"ensemble of {len(runs)} fold models: {manifest} (python predict.py ckpt={manifest.parent})")
    return 0


def _reference_into(args: argparse.Namespace) -> int:
    """``--reference-into FOLDER``: add ``reference_scores`` to an existing ensemble, nothing else."""
    try:
        if args.ensemble_out is not None or args.out is not None:
            raise CVError("--reference-into only updates an ensemble.json: drop --ensemble-out and --out")
        runs = find_fold_runs(args.dirs)
        path = add_reference_scores(runs, args.reference_into)
    except (CVError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    print(f"added {REFERENCE_KEY} of {len(runs)} fold runs to {path}")
    return 0


def reference_scores_of(runs: Sequence[FoldRun], temperature: float) -> ReferenceScores:
    """The fold models' per-class distribution of calibrated logits on their pooled clean out-of-fold films."""
    runs = sorted(runs, key=lambda r: r.fold)
    check_runs(runs)
    logits = torch.cat([r.predictions.logits for r in runs])
    labels = torch.cat([r.predictions.labels for r in runs])
    return ReferenceScores.from_logits(logits, labels, temperature)


def add_reference_scores(runs: Sequence[FoldRun], folder: str | Path) -> Path:
    """Store the runs' reference score distribution in ``folder/ensemble.json`` at its own temperature,
    without touching the checkpoints; the members must be these runs' fold models (``fold<k>.ckpt``, as
    ``--ensemble-out`` names them), evaluated on the same folds."""
    folder = Path(folder)
    manifest = read_ensemble_manifest(folder / MANIFEST_NAME)
    members = sorted(Path(m).name for m in manifest["members"])
    expected = sorted(f"fold{r.fold}.ckpt" for r in runs)
    if members != expected:
        raise CVError(
            f"{folder / MANIFEST_NAME}: members {members} are not the fold models of these runs ({expected}); "
            "the reference must come from the members' own out-of-fold predictions"
        )
    scores = reference_scores_of(runs, float(manifest["temperature"]))
    return update_ensemble_manifest(folder, **{REFERENCE_KEY: scores.to_json()})


def write_fold_ensemble(runs: Sequence[FoldRun], result: Mapping[str, Any], out_dir: str | Path) -> Path:
    """The fold models as one ensemble for ``predict.py ckpt=DIR``: float16 copies of each best checkpoint
    plus ``ensemble.json`` with the pooled out-of-fold temperature and threshold, and the reference score
    distribution a site profile checks unlabelled films against."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    members = []
    for run in runs:
        source = run.run_dir / "checkpoints" / BEST_NAME
        if not source.is_file():
            raise CVError(f"{source}: fold {run.fold}'s best checkpoint is missing")
        members.append(export_for_inference(source, out_dir / f"fold{run.fold}.ckpt", half=True).name)
    pooled = result["pooled"]["at_threshold"]
    stats = [load_model(out_dir / name).ood for name in members]
    ood = {}  # every member carries OOD statistics (train.py fits them): say how their scores combine
    if all(s is not None for s in stats):
        ood["ood"] = manifest_section(stats[0].acceptance, int(stats[0].components.shape[0]))  # type: ignore[union-attr]
    return write_ensemble_manifest(
        out_dir,
        members,
        threshold=result["threshold"],
        temperature=result["temperature"],
        threshold_rule=f"{result['threshold_rule']} on pooled out-of-fold predictions",
        description=f"{len(runs)} fold models of one {result['n_folds']}-fold patient-grouped cross-validation",
        out_of_fold={k: pooled[k] for k in ("auroc", "accuracy", "sensitivity", "specificity")},
        n_out_of_fold=result["n_images"],
        **{REFERENCE_KEY: reference_scores_of(runs, float(result["temperature"])).to_json()},
        **ood,
    )


if __name__ == "__main__":
    raise SystemExit(main())
