"""``python -m xray.site ckpt=... input=DIR output=site.json`` (Hydra, conf/site.yaml): fit a site profile
(temperature, prevalence, threshold) on a hospital's own films, and report how the site differs from
the model's validation. ``predict.py site=site.json`` applies the profile."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xray.cli import hydra_entry
from xray.core.atomic import atomic_write_text
from xray.core.config_checks import ConfigError, is_int, is_num
from xray.core.constants import CLASS_TO_INDEX, CLASSES, IMAGE_EXTENSIONS
from xray.core.errors import UserError
from xray.data.io import probe_image
from xray.data.records import find_images
from xray.evaluation import plots
from xray.evaluation.site import (
    PREVALENCE_MODES,
    SiteOptions,
    SiteSummary,
    render_site_report,
    site_figures,
    summarise_site,
    verdict,
)
from xray.inference.predict import predict_files, resolve_device
from xray.inference.predictor import load_predictor
from xray.inference.site import (
    model_record,
    model_validation,
    profile_data,
    reference_for,
    threshold_rule,
    write_site_profile,
)

log = logging.getLogger("xray.site")

LABELS = {"normal": 0, "pneumonia": 1, "0": 0, "1": 1}
"""Accepted labels in a labels CSV (names case-insensitively)."""
OOD_WARN_FACTOR = (
    2.0  # warn when more films are flagged out of distribution than this times the expected share
)


class SiteInputError(UserError, ValueError):
    """The site's films or labels cannot be used; the message names the file or CSV row."""


@dataclass(frozen=True)
class Film:
    """One of the site's films: its file, its label (None: unlabelled), its name in the profile."""

    path: Path
    label: int | None
    name: str


# -------------------------------------------------------------------------------------------- settings
def check_settings(cfg: Any) -> SiteOptions:
    """Every setting checked before a checkpoint or a film is read."""
    for name, low in (("batch_size", 1), ("num_workers", 0), ("n_bootstrap", 1), ("min_per_class", 1)):
        value = cfg.get(name)
        if not is_int(value) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if not is_int(cfg.get("seed")):
        raise ConfigError(f"seed must be an integer, got {cfg.get('seed')!r}")
    alpha = cfg.get("alpha")
    if not is_num(alpha) or not 0.0 < alpha < 0.5:
        raise ConfigError(f"alpha must be a number in (0, 0.5), got {alpha!r}")
    target = cfg.get("target_sensitivity")
    if target is not None and (not is_num(target) or not 0.0 < target <= 1.0):
        raise ConfigError(f"target_sensitivity must be null or a number in (0, 1], got {target!r}")
    prevalence = cfg.get("prevalence")
    if is_num(prevalence):
        if not 0.0 < prevalence < 1.0:
            raise ConfigError(f"prevalence must be in (0, 1), got {prevalence!r}")
    elif prevalence not in PREVALENCE_MODES:
        raise ConfigError(
            f"prevalence must be a number in (0, 1) or one of {', '.join(PREVALENCE_MODES)}, got {prevalence!r}"
        )
    reference = cfg.get("reference_prevalence")
    if reference is not None and (not is_num(reference) or not 0.0 < reference < 1.0):
        raise ConfigError(f"reference_prevalence must be null or a number in (0, 1), got {reference!r}")
    if not cfg.get("input"):
        raise ConfigError(
            "input= is required: a folder of the site's films (NORMAL/ and PNEUMONIA/, or labels=CSV)"
        )
    if not cfg.get("output"):
        raise ConfigError("output= is required: where to write the site profile (site.json)")
    if not isinstance(cfg.get("skip_bad_images", False), bool):
        raise ConfigError(f"skip_bad_images must be true or false, got {cfg.skip_bad_images!r}")
    return SiteOptions(
        alpha=float(alpha),
        prevalence=float(prevalence) if is_num(prevalence) else str(prevalence),
        target_sensitivity=None if target is None else float(target),
        n_bootstrap=int(cfg.n_bootstrap),
        seed=int(cfg.seed),
        min_per_class=int(cfg.min_per_class),
    )


# ----------------------------------------------------------------------------------------------- films
def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def read_labels_csv(csv_path: Path) -> dict[Path, int]:
    """``path,label`` rows -> {resolved path: label}; every missing file, bad label or repeated path is
    reported at once, each with its row."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            if "path" not in fields or "label" not in fields:
                raise SiteInputError(
                    f"labels={csv_path}: needs a header with columns path,label (got {reader.fieldnames})"
                )
            reader.fieldnames = fields
            rows = [(reader.line_num, row) for row in reader]
    except OSError as err:
        raise SiteInputError(f"labels={csv_path}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise SiteInputError(f"labels={csv_path}: not a UTF-8 text file") from None
    except csv.Error as err:
        raise SiteInputError(f"labels={csv_path}: not a readable CSV ({err})") from None
    labels: dict[Path, int] = {}
    problems: list[str] = []
    for line, row in rows:
        name, text = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not name:
            problems.append(f"{csv_path}:{line}: empty path")
            continue
        path = (csv_path.parent / Path(name).expanduser()).resolve()
        if text.lower() not in LABELS:
            problems.append(
                f"{csv_path}:{line}: label {text!r} of {name} is not one of NORMAL, PNEUMONIA, 0, 1"
            )
        elif not path.is_file():
            problems.append(f"{csv_path}:{line}: {name}: no such file ({path})")
        elif path in labels:
            problems.append(f"{csv_path}:{line}: {name} is listed twice")
        else:
            labels[path] = LABELS[text.lower()]
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SiteInputError(f"labels={csv_path}: {len(problems)} bad row(s):\n{shown}{more}")
    if not labels:
        raise SiteInputError(f"labels={csv_path}: no rows (a header path,label and one row per film)")
    return labels


def collect_films(
    input_dir: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None
) -> tuple[list[Film], str]:
    """The site's films and where their labels come from (``csv``, ``folders`` or ``none``): with a labels
    CSV, its films (labelled) and the folder's others (unlabelled); else the folder's films, labelled by
    a ``NORMAL/`` or ``PNEUMONIA/`` folder inside ``input_dir``."""
    root = Path(input_dir).expanduser()
    if not root.exists():
        raise SiteInputError(f"input={root}: no such folder")
    if not root.is_dir():
        raise SiteInputError(f"input={root}: must be a folder of the site's films")
    found = find_images(root)
    exts = ", ".join(sorted(IMAGE_EXTENSIONS))
    if labels_csv is not None:
        labels = read_labels_csv(Path(labels_csv).expanduser())
        films = [Film(p, label, _relative(p, root.resolve())) for p, label in labels.items()]
        listed = set(labels)
        films += [Film(p, None, _relative(p, root)) for p in found if p.resolve() not in listed]
        labelled = list(labels.values())
        for k, name in enumerate(CLASSES):
            if k not in labelled:
                raise SiteInputError(
                    f"labels={labels_csv}: no {name} films among its {len(labelled)} labelled films; fitting "
                    "a profile on labels needs films of both classes"
                )
        return films, "csv"
    if not found:
        raise SiteInputError(f"input={root}: the folder holds no films (searched recursively for {exts})")
    class_dirs = [root / name for name in CLASSES if (root / name).is_dir()]
    films = []
    for path in found:
        top = path.relative_to(root).parts[0]
        films.append(
            Film(
                path,
                CLASS_TO_INDEX.get(top) if len(path.relative_to(root).parts) > 1 else None,
                _relative(path, root),
            )
        )
    if class_dirs:
        for k, name in enumerate(CLASSES):
            if not any(f.label == k for f in films):
                raise SiteInputError(
                    f"input={root}: {root / name} is missing or holds no films; a site labelled by folder needs "
                    f"films in both {CLASSES[0]}/ and {CLASSES[1]}/ (a flat folder of unlabelled films gives the "
                    "prevalence only)"
                )
        return films, "folders"
    return films, "none"


def drop_unreadable(films: Sequence[Film], bad: dict[str, str], skip: bool, where: str) -> list[Film]:
    """Stop on unreadable films, listing them all (``skip_bad_images=false``), or leave them out."""
    if not bad:
        return list(films)
    listing = "\n".join(f"  {path}: {reason}" for path, reason in sorted(bad.items()))
    if not skip:
        raise SiteInputError(
            f"{len(bad)} unreadable film(s) in {where}:\n{listing}\n"
            "Fix or remove them, or set skip_bad_images=true to leave them out."
        )
    log.warning("leaving out %d unreadable film(s) in %s:\n%s", len(bad), where, listing)
    return [f for f in films if str(f.path) not in bad]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def films_record(
    films: Sequence[Film], input_dir: Path, labels_from: str, skipped: dict[str, str]
) -> dict[str, Any]:
    """Which films the profile was fitted on: counts, each film's name, label and sha256, and one hash of all."""
    listing = [
        {"path": f.name, "label": None if f.label is None else CLASSES[f.label], "sha256": _sha256(f.path)}
        for f in films
    ]
    combined = hashlib.sha256("".join(sorted(item["sha256"] for item in listing)).encode()).hexdigest()
    return {
        "input": str(input_dir),
        "labels_from": labels_from,
        "n": len(films),
        "n_normal": sum(1 for f in films if f.label == 0),
        "n_pneumonia": sum(1 for f in films if f.label == 1),
        "n_unlabelled": sum(1 for f in films if f.label is None),
        "sha256": combined,
        "skipped": [{"path": p, "reason": r} for p, r in sorted(skipped.items())],
        "list": listing,
    }


# -------------------------------------------------------------------------------------------- the run
@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The fits are thousands of small vectorised steps, where handing work to a second thread costs
    more than it saves (ten times slower on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _report_dir(cfg: Any, output: Path) -> Path:
    return (
        Path(str(cfg.report)).expanduser() if cfg.get("report") else output.with_name(f"{output.stem}_report")
    )


def _ood_share(rows: Sequence[Any], threshold: float, acceptance: float | None) -> dict[str, Any] | None:
    scored = [r for r in rows if r.ood_score is not None]
    if not scored or acceptance is None:
        return None
    flagged = sum(1 for r in scored if r.ood_score > threshold)
    return {"n": len(scored), "flagged": flagged, "share": flagged / len(scored), "acceptance": acceptance}


def _fmt(values: dict[str, Any] | None, key: str) -> str:
    if values is None or values.get(key) is None or not math.isfinite(values[key]):
        return "n/a"
    low, high = (values.get("ci") or {}).get(key, (math.nan, math.nan))
    ci = f" ({low:.3f}-{high:.3f})" if math.isfinite(low) and math.isfinite(high) else ""
    return f"{values[key]:.3f}{ci}"


def summary_lines(
    summary: SiteSummary, model: Any, record: dict[str, Any], kind_text: tuple[str, str]
) -> list[str]:
    """The terminal summary: films, the site before and after, the profile's values, the verdict."""
    fit = summary.fit
    lines = [
        f"model: {record['source']} (fingerprint {record['fingerprint'][:12]})",
        f"films: {summary.n} ({summary.n_normal} NORMAL, {summary.n_pneumonia} PNEUMONIA, {summary.n_unlabelled} unlabelled)",
    ]
    if summary.before is not None and summary.after is not None:
        b, a = summary.before, summary.after
        lines.append(
            f"site AUROC {_fmt(b, 'auroc')}; log loss {b['log_loss']:.3f} -> {a['log_loss']:.3f} with the profile"
        )
        lines.append(
            f"at the model's threshold {model.threshold:.3f}: sensitivity {_fmt(b, 'sensitivity')}, "
            f"specificity {_fmt(b, 'specificity')}, accuracy {_fmt(b, 'accuracy')}"
        )
        lines.append(
            f"with the profile (cross-fitted): sensitivity {_fmt(a, 'sensitivity')}, "
            f"specificity {_fmt(a, 'specificity')}, accuracy {_fmt(a, 'accuracy')}"
        )
    calibration = "fitted" if fit.calibration_changed else "the model's"
    prevalence = "fitted" if fit.prevalence_changed else "the model's"
    lines.append(
        f"profile: temperature {model.temperature:.3f} -> {fit.temperature:.3f}, bias {fit.bias:+.2f} "
        f"({calibration}); prevalence {fit.reference_prevalence:.3f} -> {fit.prevalence:.3f} ({prevalence}); "
        f"threshold {model.threshold:.3f} -> {fit.threshold:.3f}"
    )
    lines.append(f"verdict: {kind_text[1]}")
    return lines


def run_site(cfg: Any) -> int:
    """``python -m xray.site``: predict the site's films, fit the profile, write it and the report."""
    options = check_settings(cfg)
    output = Path(str(cfg.output)).expanduser()
    input_dir = Path(str(cfg.input)).expanduser()
    predictor = load_predictor(str(cfg.ckpt), cfg.log_dir)
    log.info("checkpoint: %s", predictor.source)
    films, labels_from = collect_films(input_dir, cfg.get("labels"))
    skip = bool(cfg.get("skip_bad_images", False))
    bad = {str(f.path): reason for f in films if (reason := probe_image(f.path)) is not None}
    films = drop_unreadable(films, bad, skip, str(input_dir))
    match = bool(cfg.get("match_encoding", True))
    rows = predict_files(
        predictor,
        [f.path for f in films],
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        device=resolve_device(cfg.device),
        progress=True,
        match_encoding=match,
    )
    failed = {row.path: row.error or "not predicted" for row in rows if row.logit is None}
    films = drop_unreadable(films, failed, skip, str(input_dir))
    rows = [row for row in rows if row.logit is not None]
    skipped = {**bad, **failed}
    if not films:
        raise SiteInputError(f"input={input_dir}: no readable films left")
    labelled = [f.label for f in films if f.label is not None]
    if labelled and len(set(labelled)) < 2:
        missing = CLASSES[1 - labelled[0]]
        raise SiteInputError(f"input={input_dir}: no readable {missing} films left among the labelled ones")
    z = torch.tensor([row.logit for row in rows], dtype=torch.float64)
    labels = torch.tensor([-1 if f.label is None else f.label for f in films], dtype=torch.long)
    model = reference_for(predictor, cfg.get("reference_prevalence"))
    record = model_record(predictor, match)
    with one_thread():
        summary = summarise_site(z, labels, model, options)
    validation = model_validation(predictor)
    kind_text = verdict(summary, None if validation is None else validation.get("auroc"))
    stats = predictor.ood_stats
    ood = _ood_share(rows, predictor.ood_threshold, stats[0].acceptance if stats else None)
    warnings = list(summary.warnings)
    if skipped:
        warnings.append(f"{len(skipped)} unreadable film(s) left out (listed in the profile)")
    if ood is not None and ood["flagged"] >= 3 and ood["share"] > OOD_WARN_FACTOR * (1 - ood["acceptance"]):
        warnings.append(
            f"{ood['flagged']} of {ood['n']} films ({100 * ood['share']:.0f}%) are flagged outside the training "
            f"distribution (about {100 * (1 - ood['acceptance']):.0f}% expected): these films differ from the "
            "training films"
            + (
                "; a prevalence estimated from unlabelled films can mistake such a shift for a change of prevalence"
                if summary.n_unlabelled
                else ""
            )
        )
    if kind_text[0] == "no_fit":
        warnings.append("the model does not fit this site: it ranks these films much worse (see the verdict)")
    report_dir = _report_dir(cfg, output)
    figures = site_figures(summary, model, labels)
    written = [plots.save_figure(fig, report_dir / f"{name}.png").name for name, fig in figures.items()]
    summary.warnings = warnings
    header = {
        "model": f"{record['source']} (fingerprint {record['fingerprint'][:12]})",
        "films": f"{input_dir} (labels from {labels_from})",
        "profile": str(output),
    }
    report = render_site_report(
        summary,
        model,
        header=header,
        validation=validation,
        ood=ood,
        verdict_text=kind_text[1],
        figures=written,
    )
    site = {
        "before": summary.before,
        "after_cross_fitted": summary.after,
        "ood": ood,
    }
    data = profile_data(
        summary.fit,
        record,
        intervals=summary.intervals,
        films=films_record(films, input_dir, labels_from, skipped),
        prevalence_method=str(options.prevalence),
        threshold_rule="target_sensitivity" if options.target_sensitivity is not None else model.rule,
        alpha=options.alpha,
        site=site,
        validation=validation,
        verdict=kind_text,
        warnings=warnings,
        options={
            "target_sensitivity": options.target_sensitivity,
            "prevalence": options.prevalence,
            "n_bootstrap": options.n_bootstrap,
            "seed": options.seed,
            "min_per_class": options.min_per_class,
            "model_threshold_rule": threshold_rule(predictor),
        },
    )
    write_site_profile(output, data)
    report_path = atomic_write_text(report_dir / "site_report.md", report)
    for warning in warnings:
        log.warning("%s", warning)
    for line in summary_lines(summary, model, record, kind_text):
        print(line)
    print(f"wrote {output} and {report_path}")
    return 0


def main() -> None:
    """``python -m xray.site key=value ...`` (Hydra, conf/site.yaml); user errors exit 2 with one line."""
    hydra_entry("site", run_site)


if __name__ == "__main__":
    main()
