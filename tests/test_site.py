"""Site calibration, the statistics (xray.evaluation.site) and the profile file (xray.inference.site):
EM prevalence, Bayes' rule, temperature direction, the keep-unless-shown rule, verdicts, the profile's
round trip and refusal, and the simulation script on synthetic fold runs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import PROJECT_ROOT
from tests.test_ensemble import make_net, save_ckpt
from xray.core.checkpoint_io import CheckpointError
from xray.cv import main as cv_main
from xray.evaluation.folds import find_fold_runs
from xray.evaluation.site import (
    MIXTURE_ALPHA,
    ModelReference,
    ReferenceScores,
    SiteFit,
    SiteOptions,
    chi2_critical,
    cross_fitted,
    em_prevalence,
    fit_batch,
    fit_site,
    logodds,
    prior_shift,
    render_site_report,
    resample_to_prevalence,
    rule_of,
    sample_warnings,
    summarise_site,
    verdict,
)
from xray.inference.checkpoints import update_checkpoint_meta
from xray.inference.predictor import load_predictor, update_ensemble_manifest, write_ensemble_manifest
from xray.inference.site import (
    SiteProfileError,
    apply_site,
    check_site_profile,
    load_site_profile,
    model_fingerprint,
    model_record,
    profile_data,
    reference_for,
    write_site_profile,
)

REF = 3875 / 5216
SEP = 2.03  # binormal class means at +-SEP: AUROC ~0.998


def binormal(n: int, prevalence: float, seed: int, sep: float = SEP) -> tuple[torch.Tensor, torch.Tensor]:
    """(log likelihood ratio, labels) of a unit-variance binormal latent: the Bayes-calibrated evidence."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < prevalence).long()
    x = (2 * y - 1).double() * sep + torch.randn(n, generator=g, dtype=torch.float64)
    return 2 * sep * x, y


def model_logits(llr: torch.Tensor, temperature: float) -> torch.Tensor:
    """Raw logits of a model calibrated at REF with temperature T: z = T * (llr + logodds(REF))."""
    return temperature * (llr + logodds(REF))


def reference_scores(n: int = 20000, seed: int = 99) -> ReferenceScores:
    """The binormal model's validation score distribution, as ``python -m xray.cv`` stores it."""
    llr, y = binormal(n, REF, seed=seed)
    return ReferenceScores.from_logits(model_logits(llr, 0.6), y, 0.6)


MODEL = ModelReference(
    temperature=0.6,
    threshold=0.785,
    reference_prevalence=REF,
    rule="youden",
    reference_scores=reference_scores(),
)
MODEL_NO_REFERENCE = ModelReference(temperature=0.6, threshold=0.785, reference_prevalence=REF, rule="youden")


@pytest.fixture(autouse=True)
def one_thread():
    """Small vectorised fits: one thread is ten times faster than two on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- statistics
def test_prior_shift_is_bayes_rule() -> None:
    llr, _ = binormal(500, 0.5, seed=1)
    at_ref = llr + logodds(REF)  # the calibrated logit at the reference prevalence
    for prevalence in (0.1, 0.4, 0.9):
        bayes = prevalence * llr.exp() / (prevalence * llr.exp() + (1 - prevalence))
        shifted = torch.sigmoid(prior_shift(at_ref, prevalence, REF))
        assert torch.allclose(shifted, bayes, atol=1e-12)


@pytest.mark.parametrize("prevalence", [0.1, 0.4, 0.9])
def test_em_recovers_a_known_prevalence_without_labels(prevalence: float) -> None:
    # seed 6: a draw the mixture guard accepts at every prevalence (by design it refuses about
    # MIXTURE_ALPHA of true prior shifts; that rate is tested below)
    llr, _ = binormal(3000, prevalence, seed=6)
    s = llr + logodds(REF)
    n = s.numel()
    pi, stat = em_prevalence(s, torch.zeros(n), torch.zeros(1, n), torch.ones(1, n), REF)
    assert float(pi[0]) == pytest.approx(prevalence, abs=0.025)
    # and the same through the site fit: unlabelled films (label -1) move only the prevalence
    fit = fit_site(model_logits(llr, 0.6), torch.full((n,), -1), MODEL)
    assert fit.prevalence == pytest.approx(prevalence, abs=0.025)
    assert fit.prevalence_changed and not fit.calibration_changed
    assert fit.temperature == MODEL.temperature


def test_em_keeps_the_reference_when_the_films_do_not_show_a_change() -> None:
    llr, _ = binormal(60, REF, seed=3)
    fit = fit_site(model_logits(llr, 0.6), torch.full((60,), -1), MODEL)
    assert not fit.prevalence_changed and fit.prevalence == REF
    assert fit.threshold == pytest.approx(MODEL.threshold)  # no change: the model's own decisions


@pytest.mark.parametrize(("scale", "direction"), [(3.0, 1), (1 / 3, -1)])
def test_temperature_moves_the_right_way(scale: float, direction: int) -> None:
    """Raw logits 3x too confident need a 3x larger temperature; 3x too timid, a 3x smaller one."""
    llr, y = binormal(400, 0.5, seed=4, sep=1.0)
    z = model_logits(llr, 0.6) * scale
    fit = fit_site(z, y, MODEL)
    assert fit.calibration_changed
    ratio = fit.temperature / MODEL.temperature
    assert ratio == pytest.approx(scale, rel=0.25)
    assert (ratio - 1) * direction > 0


def test_calibrated_sites_keep_the_models_values_in_most_samples() -> None:
    """The keep-unless-shown rule: on films the model is calibrated for, the calibration changes in about
    alpha of samples (here 400 samples of 50 films at a 40% site)."""
    llr, y = binormal(20000, 0.4, seed=5)
    z = model_logits(llr, 0.6)
    g = torch.Generator().manual_seed(0)
    idx = torch.argsort(torch.rand(400, z.numel(), generator=g), dim=1)[:, :50]
    ones = torch.ones(400, 50, dtype=torch.float64)
    batch = fit_batch(z[idx], y[idx], ones, torch.zeros_like(ones), MODEL, alpha=0.01)
    assert float(batch.calibration_changed.double().mean()) < 0.04
    kept = ~batch.calibration_changed
    assert torch.all(batch.temperature[kept] == MODEL.temperature)
    assert torch.allclose(batch.cut[kept], torch.full_like(batch.cut[kept], MODEL.cut))
    # the labelled share of a random sample sets the prevalence when it clearly differs from the model's
    assert float(batch.prevalence_changed.double().mean()) > 0.8
    assert float(batch.prevalence[batch.prevalence_changed].median()) == pytest.approx(0.4, abs=0.05)


def test_decisions_do_not_depend_on_the_prevalence() -> None:
    llr, y = binormal(300, 0.3, seed=6, sep=1.2)
    z = model_logits(llr, 0.6) * 2.0
    fits = [fit_site(z, y, MODEL, SiteOptions(prevalence=p)) for p in (0.05, 0.3, 0.9)]
    calls = [(fit.probs(z) >= fit.threshold) for fit in fits]
    assert all(torch.equal(calls[0], c) for c in calls[1:])
    assert fits[0].threshold < fits[1].threshold < fits[2].threshold
    # Youden's point of a refitted calibration: the threshold on the site's probability is its prevalence
    assert fits[1].threshold == pytest.approx(0.3)


def test_target_sensitivity_keeps_that_share_of_pneumonia_films() -> None:
    llr, y = binormal(400, 0.5, seed=7, sep=1.0)
    z = model_logits(llr, 0.6)
    fit = fit_site(z, y, MODEL, SiteOptions(target_sensitivity=0.9))
    calls = fit.probs(z) >= fit.threshold
    sensitivity = float(calls[y == 1].double().mean())
    assert 0.9 <= sensitivity < 0.92


def test_fixed_rule_gives_one_half_on_the_site_probability() -> None:
    llr, y = binormal(300, 0.3, seed=8, sep=1.0)
    fixed = ModelReference(0.6, 0.5, REF, rule_of("fixed"))
    assert fit_site(model_logits(llr, 0.6) * 2, y, fixed).threshold == pytest.approx(0.5)
    assert rule_of("shift_youden on pooled out-of-fold predictions") == "youden"


def test_cross_fitted_scores_leave_each_film_out() -> None:
    """A film's cross-fitted probability does not move when its own label flips (it is not in its fit)."""
    llr, y = binormal(40, 0.5, seed=9, sep=1.0)
    z = model_logits(llr, 0.6) * 3
    p1, _ = cross_fitted(z, y, MODEL)
    flipped = y.clone()
    flipped[0] = 1 - flipped[0]
    p2, _ = cross_fitted(z, flipped, MODEL)
    assert float(p1[0]) == pytest.approx(float(p2[0]), abs=1e-12)
    assert not torch.allclose(p1[1:], p2[1:])


def test_chi2_critical_values() -> None:
    assert chi2_critical(1, 0.05) == pytest.approx(3.841, abs=1e-3)
    assert chi2_critical(2, 0.01) == pytest.approx(9.210, abs=1e-3)


# -------------------------------------------------------------------------------- warnings and verdict
def test_fewer_than_20_films_of_a_class_warn() -> None:
    found = sample_warnings(12, 40, SiteOptions())
    assert len(found) == 1 and "only 12 NORMAL film(s) (fewer than 20)" in found[0]
    found = sample_warnings(30, 25, SiteOptions(target_sensitivity=0.95))
    assert any("target_sensitivity=0.95 with 25 PNEUMONIA" in w and "at least 60" in w for w in found)
    assert "no labelled films" in sample_warnings(0, 0, SiteOptions())[0]


def test_much_lower_auroc_than_validation_does_not_fit() -> None:
    llr, y = binormal(200, 0.5, seed=10, sep=0.5)  # AUROC ~0.76
    summary = summarise_site(model_logits(llr, 0.6), y, MODEL, SiteOptions(n_bootstrap=200))
    assert summary.before["auroc"] < 0.85
    kind, text = verdict(summary, validation_auroc=0.99)
    assert kind == "no_fit" and "does not fit this site" in text and "cannot restore the ranking" in text
    good_llr, good_y = binormal(200, 0.5, seed=11)
    good = summarise_site(model_logits(good_llr, 0.6) * 3, good_y, MODEL, SiteOptions(n_bootstrap=200))
    assert verdict(good, validation_auroc=0.99)[0] == "recalibrated"


def test_summary_bootstrap_intervals_hold_the_fitted_values() -> None:
    llr, y = binormal(150, 0.4, seed=12, sep=1.2)
    summary = summarise_site(model_logits(llr, 0.6) * 2, y, MODEL, SiteOptions(n_bootstrap=300))
    fit = summary.fit
    assert fit.calibration_changed
    for name in ("temperature", "prevalence", "threshold"):
        low, high = summary.intervals[name]
        assert low <= getattr(fit, name) <= high, name
    assert summary.after["log_loss"] < summary.before["log_loss"]


def test_resample_to_prevalence() -> None:
    y = torch.tensor([1] * 74 + [0] * 26)
    idx = resample_to_prevalence(y, 0.1, torch.Generator().manual_seed(0))
    assert float(y[idx].double().mean()) == pytest.approx(0.1, abs=0.01) and int((y[idx] == 0).sum()) == 26


# ---------------------------------------------------------------------------------------- the profile
@pytest.fixture
def two_models(tmp_path: Path) -> tuple[Path, Path]:
    return save_ckpt(tmp_path / "a.ckpt", make_net(32, 0)), save_ckpt(tmp_path / "b.ckpt", make_net(32, 1))


def _fit(temperature: float = 2.0, offset: float = -0.5, threshold: float = 0.3) -> SiteFit:
    return SiteFit(
        temperature=temperature,
        bias=-0.2,
        prevalence=0.4,
        cut=0.1,
        threshold=threshold,
        offset=offset,
        reference_prevalence=REF,
        calibration_changed=True,
        prevalence_changed=True,
        calibration_stat=12.0,
        prevalence_stat=math.nan,
    )


def test_profile_round_trips(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    predictor = load_predictor(str(two_models[0]))
    data = profile_data(_fit(), model_record(predictor), films={"n": 3}, warnings=["w"])
    written = write_site_profile(tmp_path / "site.json", data)
    loaded = load_site_profile(tmp_path / "site.json")
    assert (loaded.temperature, loaded.offset, loaded.threshold) == (2.0, -0.5, 0.3)
    assert loaded.fingerprint == written.fingerprint == model_fingerprint(predictor)
    assert loaded.data["fitted"]["tests"]["prevalence_likelihood_ratio"] is None  # nan -> null
    z = torch.tensor([-3.0, 0.0, 1.5])
    probs, calls = apply_site(z, loaded)
    assert torch.allclose(probs, torch.sigmoid(z.double() / 2.0 - 0.5))
    assert calls.tolist() == [False, True, True]
    check_site_profile(loaded, predictor)  # its own model: accepted
    assert loaded.label == f"site.json (model {loaded.fingerprint[:12]})"


def test_another_models_profile_is_refused(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = (load_predictor(str(p)) for p in two_models)
    write_site_profile(tmp_path / "site.json", profile_data(_fit(), model_record(a)))
    profile = load_site_profile(tmp_path / "site.json")
    with pytest.raises(SiteProfileError) as err:
        check_site_profile(profile, b)
    message = str(err.value)
    assert f"was fitted for model {model_fingerprint(a)[:12]} ({a.source})" in message
    assert f"this is model {model_fingerprint(b)[:12]} ({b.source})" in message
    with pytest.raises(SiteProfileError, match="tta=true changes"):
        check_site_profile(profile, a, tta=True)
    with pytest.raises(SiteProfileError, match="match_encoding=true"):
        check_site_profile(profile, a, match_encoding=False)


def test_fingerprint_follows_the_weights_not_the_stored_threshold(tmp_path: Path) -> None:
    path = save_ckpt(tmp_path / "m.ckpt", make_net(32, 0))
    before = model_fingerprint(load_predictor(str(path)))
    update_checkpoint_meta(
        path, threshold=0.3, temperature=1.7, threshold_rule="youden"
    )  # as xray.ood writes
    assert model_fingerprint(load_predictor(str(path))) == before
    save_ckpt(path, make_net(32, 0), interpolation="nearest")  # other preprocessing
    assert model_fingerprint(load_predictor(str(path))) != before
    save_ckpt(path, make_net(32, 2))  # other weights
    assert model_fingerprint(load_predictor(str(path))) != before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        (json.dumps({"kind": "xray-site-profile", "format": 7}), "format 7, this version reads format 1"),
        (json.dumps({"format": 1}), "not a site profile"),
    ],
)
def test_bad_profile_files_say_what_is_wrong(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "site.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SiteProfileError, match=message):
        load_site_profile(path)


def test_a_profile_with_bad_numbers_is_refused(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    data = profile_data(_fit(), model_record(load_predictor(str(two_models[0]))))
    data["apply"]["temperature"] = -1
    path = tmp_path / "site.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SiteProfileError, match="apply.temperature must be a finite number > 0"):
        load_site_profile(path)


# ---------------------------------------------------------------------------------------- simulation
def _simulation_script():
    spec = importlib.util.spec_from_file_location(
        "site_simulation", PROJECT_ROOT / "benchmarks" / "site_simulation.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_simulation_on_synthetic_fold_runs(tmp_path: Path) -> None:
    script = _simulation_script()
    out, js = tmp_path / "sim.md", tmp_path / "sim.json"
    args = ["--synthetic", str(tmp_path / "runs"), "--synthetic-films", "300", "--draws", "20"]
    args += [
        "--ks",
        "0,20",
        "--prevalences",
        "0.10,0.74",
        "--by-shift-k",
        "20",
        "--out",
        str(out),
        "--json",
        str(js),
    ]
    assert script.main(args) == 0
    text = out.read_text()
    assert "| 0.10 | 0 (100 unlabelled) |" in text and "| 0.74 | 20 |" in text and "| test_like |" in text
    rows = {(r["prevalence"], r["k"]): r for r in json.loads(js.read_text())["rows"]}
    assert set(rows) == {(0.1, 0), (0.1, 20), (0.74, 0), (0.74, 20)}
    assert all(r["sites"] == 5 * 15 for r in rows.values())
    # a 10% site: the prior shift alone (no labels) cuts the log loss of a model calibrated at 74%
    low = rows[(0.1, 0)]
    assert low["log_loss_profile_median"] < 0.7 * low["log_loss_model_median"]
    # without labels the decisions never change
    assert low["accuracy_profile_median"] == low["accuracy_model_median"]
    assert low["accuracy_sites_worse"] == 0 and low["calibration_changed"] == 0.0


# ------------------------------------------------------------------ unlabelled films: the mixture guard
def _overcall(n: int, prevalence: float, seed: int, share: float = 0.5) -> torch.Tensor:
    """Raw logits of a site where a ``share`` of the NORMAL films is over-called (scores moved to the
    uncertain middle, as burned-in text or tight collimation do): not a mix of the validation's classes."""
    llr, y = binormal(n, prevalence, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    moved = (y == 0) & (torch.rand(n, generator=g, dtype=torch.float64) < share)
    middle = 2 * SEP * (0.3 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    return model_logits(torch.where(moved, middle, llr), 0.6)


def test_mixture_guard_refuses_an_overcall_shift_and_keeps_a_pure_prior_shift() -> None:
    unlabelled = torch.full((300,), -1)
    llr, _ = binormal(300, 0.2, seed=5)
    prior = fit_site(model_logits(llr, 0.6), unlabelled, MODEL)
    assert prior.unlabelled == "used" and prior.prevalence_changed
    assert prior.prevalence == pytest.approx(0.2, abs=0.06)
    assert prior.mixture_stat < chi2_critical(MODEL.reference_scores.df, 0.01)  # type: ignore[union-attr]
    shifted = fit_site(_overcall(300, 0.2, seed=5), unlabelled, MODEL)
    assert shifted.unlabelled == "not_a_mixture"
    assert shifted.mixture_stat > chi2_critical(shifted.mixture_df or 0, 0.01)
    assert not shifted.prevalence_changed and shifted.prevalence == REF  # EM alone would have moved it
    assert (
        fit_site(_overcall(300, 0.2, seed=5), unlabelled, MODEL_NO_REFERENCE, SiteOptions()).prevalence == REF
    )
    unguarded = fit_batch(
        _overcall(300, 0.2, seed=5), unlabelled, torch.zeros(1, 300), torch.ones(1, 300), MODEL, pretest=False
    )
    assert abs(float(unguarded.prevalence[0]) - REF) > 0.2  # what the guard prevents


def test_mixture_guard_is_batched_and_rarely_refuses_prior_shifts() -> None:
    llr, _ = binormal(2000, 0.1, seed=6)
    z_prior, z_shift = model_logits(llr, 0.6), _overcall(2000, 0.1, seed=6)
    g = torch.Generator().manual_seed(0)
    rows = 200
    idx = torch.stack([torch.randperm(2000, generator=g)[:100] for _ in range(rows)])
    ones = torch.ones(rows, 100, dtype=torch.float64)
    for z, low, high in ((z_prior, 1.0 - MIXTURE_ALPHA - 0.1, 1.0), (z_shift, 0.0, 0.2)):
        batch = fit_batch(z[idx], torch.full((rows, 100), -1), torch.zeros_like(ones), ones, MODEL)
        used = batch.unlabelled == 1  # type: ignore[operator]
        assert low <= float(used.double().mean()) <= high
        refused = ~used
        assert bool((batch.prevalence[refused] == REF).all())
        assert bool(((batch.unlabelled == 2) == refused).all())  # type: ignore[operator]


def test_without_a_reference_unlabelled_films_move_nothing_and_labels_work_as_before() -> None:
    llr, y = binormal(400, 0.2, seed=7)
    z = model_logits(llr, 0.6)
    fit = fit_site(z, torch.full((400,), -1), MODEL_NO_REFERENCE)
    assert fit.unlabelled == "no_reference" and fit.prevalence == REF and not fit.prevalence_changed
    kind, text = verdict(
        summarise_site(z[:60], torch.full((60,), -1), MODEL_NO_REFERENCE, SiteOptions(n_bootstrap=20)), None
    )
    assert kind == "unchanged" and "no reference score distribution" in text
    labelled = fit_site(z, y, MODEL_NO_REFERENCE)
    with_reference = fit_site(z, y, MODEL)  # labelled films only: the reference plays no part
    keys = (
        "temperature",
        "bias",
        "prevalence",
        "cut",
        "threshold",
        "calibration_changed",
        "prevalence_changed",
    )
    assert [getattr(labelled, k) for k in keys] == [getattr(with_reference, k) for k in keys]
    assert labelled.unlabelled == with_reference.unlabelled == "none"
    assert labelled.prevalence_changed and labelled.prevalence == pytest.approx(
        float(y.double().mean()), abs=0.01
    )


def test_refused_unlabelled_films_are_explained_in_the_report() -> None:
    summary = summarise_site(
        _overcall(200, 0.2, seed=8), torch.full((200,), -1), MODEL, SiteOptions(n_bootstrap=20)
    )
    assert any("not a mix of the model's validation" in w for w in summary.warnings)
    kind, text = verdict(summary, None)
    assert kind == "unchanged" and "recalibration without labels cannot tell" in text
    report = render_site_report(summary, MODEL, verdict_text=text)
    assert "left out above" in report and "not a mix of the validation's classes" in report


def test_reference_scores_round_trip_and_refuse_malformed_data() -> None:
    scores = MODEL.reference_scores
    assert (
        scores is not None and ReferenceScores.from_json(json.loads(json.dumps(scores.to_json()))) == scores
    )
    assert sum(scores.normal) + sum(scores.pneumonia) == 20000 and scores.df == len(scores.edges) - 1
    good = scores.to_json()
    for change, message in (
        ({"edges": [1.0, 0.0]}, "increase strictly"),
        ({"NORMAL": [1, 2]}, "must hold 10 counts"),
        ({"PNEUMONIA": [-1] * 10}, "finite numbers >= 0"),
        ({"temperature": 0}, "temperature must be"),
        ({"NORMAL": "many"}, "must be lists"),
    ):
        with pytest.raises(ValueError, match=message):
            ReferenceScores.from_json({**good, **change})
    with pytest.raises(ValueError, match="lacks temperature"):
        ReferenceScores.from_json({k: v for k, v in good.items() if k != "temperature"})


def _ensemble(tmp_path: Path, folds: int = 2) -> Path:
    folder = tmp_path / "ensemble"
    names = [save_ckpt(folder / f"fold{k}.ckpt", make_net(32, k)).name for k in range(folds)]
    write_ensemble_manifest(folder, names, threshold=0.6, temperature=0.6, threshold_rule="youden")
    return folder


def test_a_manifest_with_malformed_reference_scores_is_refused(tmp_path: Path) -> None:
    folder = _ensemble(tmp_path)
    assert load_predictor(str(folder)).reference_scores is None  # an older manifest: no reference
    update_ensemble_manifest(folder, reference_scores=MODEL.reference_scores.to_json())  # type: ignore[union-attr]
    predictor = load_predictor(str(folder))
    assert predictor.reference_scores == MODEL.reference_scores
    assert reference_for(predictor).reference_scores == MODEL.reference_scores
    before = (folder / "ensemble.json").read_text()
    bad = {**MODEL.reference_scores.to_json(), "NORMAL": [1, 2, 3]}  # type: ignore[union-attr]
    with pytest.raises(CheckpointError, match="reference_scores: NORMAL must hold 10 counts"):
        update_ensemble_manifest(folder, reference_scores=bad)
    assert (folder / "ensemble.json").read_text() == before  # nothing written
    data = json.loads(before)
    data["reference_scores"] = bad
    (folder / "ensemble.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"ensemble.json: reference_scores: NORMAL .*--reference-into"):
        load_predictor(str(folder))


def test_cv_adds_the_reference_to_an_existing_ensemble(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _simulation_script()
    runs_dir = script.write_synthetic_runs(tmp_path / "runs", n_folds=2, per_fold=200)
    folder = _ensemble(tmp_path)
    checkpoints = {p.name: p.read_bytes() for p in folder.glob("*.ckpt")}
    assert cv_main([str(runs_dir), "--reference-into", str(folder)]) == 0
    stored = load_predictor(str(folder)).reference_scores
    runs = find_fold_runs([runs_dir])
    logits = torch.cat([r.predictions.logits for r in runs])
    labels = torch.cat([r.predictions.labels for r in runs])
    assert stored == ReferenceScores.from_logits(logits, labels, 0.6)  # at the ensemble's own temperature
    assert {p.name: p.read_bytes() for p in folder.glob("*.ckpt")} == checkpoints
    assert not (runs_dir / "cv_report.md").exists()  # nothing written beside the runs
    other = _ensemble(tmp_path / "three", folds=3)
    assert cv_main([str(runs_dir), "--reference-into", str(other)]) == 2
    assert "are not the fold models of these runs" in capsys.readouterr().err
