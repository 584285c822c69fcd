"""Temperature scaling: one scalar T, fitted on held-out logits, so that ``sigmoid(logit / T)`` means
what it says. It never changes the ranking (AUROC), so choose a threshold on the calibrated probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

T_MIN, T_MAX = 0.05, 20.0


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Calibrated P(PNEUMONIA) from raw logits."""
    return torch.sigmoid(logits.double() / float(temperature)).to(torch.float32)


def log_loss(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits / T)`` (natural log)."""
    z = logits.double().reshape(-1) / float(temperature)
    return float(F.binary_cross_entropy_with_logits(z, labels.double().reshape(-1)))


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The T in [T_MIN, T_MAX] minimising the log loss of ``sigmoid(logits / T)``; 1.0 when undefined.
    L-BFGS on log T (so T stays positive) in float64."""
    z = logits.detach().double().reshape(-1)
    y = labels.detach().double().reshape(-1)
    if z.numel() == 0 or not torch.isfinite(z).all() or y.min() == y.max():
        return 1.0
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, T_MIN), T_MAX)
