"""``python -m xray.ood key=value ...`` (Hydra, conf/ood.yaml): fit the out-of-distribution statistics of
existing checkpoints on the films each member trained on (``fit=true``, ``write=true``), and print how
well they separate held-out films from synthetic non-films (``evaluate=true``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from xray.cli import hydra_entry
from xray.core.config_checks import ConfigError
from xray.data.records import patient_folds, scan_split, split_by_patient
from xray.data.transforms import load_resized
from xray.inference.checkpoints import update_checkpoint_meta
from xray.inference.ood import (
    OOD_KEY,
    combine_scores,
    extract_features,
    fit_network,
    manifest_section,
    stratified_subsample,
)
from xray.inference.ood_families import format_separation, ood_families, separation
from xray.inference.predict import resolve_device
from xray.inference.predictor import (
    MANIFEST_NAME,
    load_predictor,
    resolve_checkpoint,
    update_ensemble_manifest,
)


def member_split(
    model: Any, records: list[Any], cfg: Any, index: int, n_members: int
) -> tuple[list[Any], list[Any], str]:
    """(training records, validation records, description) of one network, as it was trained: from the
    checkpoint's stored ``split``, else ``data.n_folds``/``data.fold``, else ``fold<k>`` in the file name
    (one fold per member, the shipped ensemble), else the patient-grouped ``val_fraction`` split."""
    stored = model.meta.get("split") or {}
    if stored.get("val_source") == "official":
        return records, scan_split(cfg.data.root, "val"), "the official val/ folder"
    seed = int(stored.get("split_seed", cfg.data.split_seed))
    n_folds, fold = stored.get("n_folds"), stored.get("fold")
    if n_folds is None and cfg.data.get("n_folds") is not None:
        n_folds = int(cfg.data.n_folds)
        fold = int(cfg.data.fold) if cfg.data.get("fold") is not None and n_members == 1 else index
    if n_folds is None:
        match = re.search(r"fold(\d+)", model.path.stem)
        if match and n_members > 1:
            n_folds, fold = n_members, int(match.group(1))
    if n_folds is not None:
        folds = patient_folds(records, int(n_folds), seed)
        train = [r for r, f in zip(records, folds, strict=True) if f != int(fold)]
        val = [r for r, f in zip(records, folds, strict=True) if f == int(fold)]
        return train, val, f"fold {fold} of {n_folds} (split seed {seed})"
    fraction = float(stored.get("val_fraction", cfg.data.val_fraction))
    train, val = split_by_patient(records, fraction, seed)
    return train, val, f"patient-grouped split, validation fraction {fraction} (seed {seed})"


def member_films(
    member: Any, records: list[Any], cfg: Any, k: int, n: int
) -> tuple[list[Any], list[Any], list[Any], str]:
    """(training films to fit on, validation films for the threshold, the other validation films, where):
    seeded, so that ``evaluate=true`` later holds out exactly the films the threshold did not see."""
    train, val, where = member_split(member, records, cfg, k, n)
    keep = set(stratified_subsample([r.label for r in val], cfg.n_val, int(cfg.seed) + k))
    fit = [train[i] for i in stratified_subsample([r.label for r in train], cfg.n_fit, int(cfg.seed) + k)]
    return (
        fit,
        [r for i, r in enumerate(val) if i in keep],
        [r for i, r in enumerate(val) if i not in keep],
        where,
    )


def load_images(records: Sequence[Any], size: int, interpolation: str) -> Tensor:
    return torch.stack(
        [torch.from_numpy(load_resized(r.path, size, interpolation)) for r in records]
    ).unsqueeze(1)


def evaluate_separation(predictor: Any, records: list[Any], cfg: Any, device: Any) -> None:
    """Separation table: films held out from fitting vs the synthetic families, per member and for the ensemble."""
    stats = predictor.ood_stats
    if stats is None:
        raise ConfigError("evaluate=true: the checkpoint has no OOD statistics; run with fit=true first")
    n = len(predictor.members)
    held_out: list[Any] = []
    for k, member in enumerate(predictor.members):
        val = member_films(member, records, cfg, k, n)[2] or member_split(member, records, cfg, k, n)[1]
        picks = stratified_subsample(
            [r.label for r in val], max(1, int(cfg.n_eval) // n), int(cfg.seed) + 100 + k
        )
        held_out.append([val[i] for i in picks])
    size, interpolation = predictor.members[0].image_size, predictor.members[0].interpolation
    films_by_member = [load_images(v, size, interpolation) for v in held_out]
    films = torch.cat(films_by_member)
    families = ood_families(films, int(cfg.n_family), seed=int(cfg.seed))
    batches = {"films": films, **families}
    own: list[Tensor] = []
    member_scores: dict[str, list[Tensor]] = {name: [] for name in batches}
    for k, member in enumerate(predictor.members):
        for name, images in batches.items():
            _, f = extract_features(member.net, images, batch_size=int(cfg.batch_size), device=device)
            member_scores[name].append(stats[k].score(f))
            if name == "films":  # the member's own held-out films
                start = sum(len(v) for v in films_by_member[:k])
                own.append(stats[k].score(f[start : start + len(films_by_member[k])]))
    lines = ["## OOD score separation", ""]
    per_member = separation(
        torch.cat(own), {k: torch.cat(v) for k, v in member_scores.items() if k != "films"}, 1.0
    )
    lines += format_separation(
        per_member,
        "each member on its own fold's held-out validation films (never seen in its training), threshold 1.0",
    )
    combined = {k: combine_scores(v) for k, v in member_scores.items()}
    ensemble = separation(combined.pop("films"), combined, predictor.ood_threshold)
    if n > 1:
        lines += [""] + format_separation(
            ensemble,
            f"the ensemble's score (mean of {n} members) on the same films, threshold {predictor.ood_threshold:g}; "
            f"each film was in the training data of {n - 1} of the {n} members",
        )
    print("\n".join(lines))


def run_ood(cfg: Any) -> int:
    """Fit (``write=true``) and/or evaluate (``evaluate=true``) the OOD statistics of ``ckpt``."""
    if not 0.5 <= float(cfg.acceptance) < 1:
        raise ConfigError(f"acceptance must be in [0.5, 1), got {cfg.acceptance}")
    device = resolve_device(cfg.device)
    target = resolve_checkpoint(str(cfg.ckpt), cfg.log_dir)
    predictor = load_predictor(str(cfg.ckpt), cfg.log_dir)
    records = scan_split(cfg.data.root, "train")
    n = len(predictor.members)
    if cfg.fit:
        for k, member in enumerate(predictor.members):
            train, val, _, where = member_films(member, records, cfg, k, n)
            print(
                f"{member.path.name}: {where}; fitting on {len(train)} training films, threshold on {len(val)} validation films",
                flush=True,
            )
            stats = fit_network(
                member.net,
                load_images(train, member.image_size, member.interpolation),
                load_images(val, member.image_size, member.interpolation),
                int(cfg.components),
                float(cfg.acceptance),
                fitted_on=f"{where}: {len(train)} training films (stratified subsample, seed {int(cfg.seed) + k}), "
                f"threshold on {len(val)} validation films",
                batch_size=int(cfg.batch_size),
                device=device,
            )
            member.meta[OOD_KEY] = stats.to_meta()
            print(
                f"  threshold {stats.threshold:.4f} (distance at {100 * stats.acceptance:.0f}% of validation films)",
                flush=True,
            )
            if cfg.write:
                update_checkpoint_meta(member.path, ood=member.meta[OOD_KEY])
        if cfg.write:
            if target.is_dir() and (target / MANIFEST_NAME).is_file():
                update_ensemble_manifest(
                    target, ood=manifest_section(float(cfg.acceptance), int(cfg.components))
                )
            print(f"OOD statistics written into {target}")
    if cfg.evaluate:
        evaluate_separation(predictor, records, cfg, device)
    return 0


def main() -> None:
    """``python -m xray.ood key=value ...`` (Hydra, conf/ood.yaml); user errors exit 2 with one line."""
    hydra_entry("ood", run_ood)


if __name__ == "__main__":
    main()
