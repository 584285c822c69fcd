"""Calibration that survives a shift: a temperature fitted on validation pooled with its shifted copies."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from xray.evaluation.calibration import fit_temperature, log_loss
from xray.evaluation.shifts import shift_temperature
from xray.training.run import fit_run_temperature


def _logits(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Labels, and logits that separate the classes clean but lose their margin under a 'shift'."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.7).long()
    sign = labels.float() * 2 - 1
    clean = sign * 6 + torch.randn(n, generator=g)
    shifted = sign * 2 + 3 * torch.randn(n, generator=g)  # some now on the wrong side, confidently
    return labels, {"clean": clean, "blur": shifted}


def test_pooling_the_shifted_copies_gives_a_softer_temperature_and_a_lower_shifted_log_loss() -> None:
    labels, logits = _logits()
    t_clean = fit_temperature(logits["clean"], labels)
    t_pooled = shift_temperature(logits, labels)
    pooled = torch.cat(list(logits.values()))
    assert t_pooled == fit_temperature(pooled, labels.repeat(2))
    assert t_pooled > t_clean
    assert log_loss(logits["blur"], labels, t_pooled) < log_loss(logits["blur"], labels, t_clean)


def test_a_run_fits_the_temperature_its_settings_ask_for() -> None:
    labels, logits = _logits(seed=1)
    ev = OmegaConf.create({"temperature": True, "temperature_on": "clean"})
    assert fit_run_temperature(logits["clean"], labels, logits, labels, ev) == fit_temperature(
        logits["clean"], labels
    )
    ev.temperature_on = "shifts"
    assert fit_run_temperature(logits["clean"], labels, logits, labels, ev) == shift_temperature(
        logits, labels
    )
    ev.temperature = False
    assert fit_run_temperature(logits["clean"], labels, logits, labels, ev) == 1.0
