"""Site calibration: fit a model's probabilities and operating point to a new hospital's films.

Everything works on the raw logit ``z`` of a film (the members' mean, before any temperature), so one
fit is one small set of numbers applied after the network::

    s = z / T_site + bias                       the site's calibrated logit at the reference prevalence
    p = sigmoid(s + logodds(pi_site) - logodds(pi_ref))     Bayes' rule for the site's prevalence
    PNEUMONIA when s >= cut                       (equivalently p >= sigmoid(cut + the same shift))

``pi_ref`` is the prevalence the model's temperature was fitted at (its out-of-fold / validation
films: 3875 / 5216 = 0.743 for every model trained on the Kermany split), so ``sigmoid(z / T)`` is a
posterior at that prevalence and the prior-shift term moves it to the site's (Saerens et al. 2002).

**What the threshold targets.** The project's models choose their threshold by Youden's J
(``youden``, ``shift_youden``): the point that maximises sensitivity + specificity. On a calibrated
score that is where a film's likelihood ratio is 1 (``s = logodds(pi_ref)``), whatever the
prevalence. A site profile keeps the rule: when the films show the site's calibration differs, the cut
is Youden's point of the refitted calibration; when they do not, the model's own stored cut stays
(the same decisions as without a profile). Either way the cut lives on the prevalence-free scale, so
a change of prevalence moves the probabilities and the threshold together, never the decisions. The
accuracy-optimal rule (0.5 on prior-corrected probabilities) would trade sensitivity for accuracy at
a low-prevalence clinic (at 10% it calls few films PNEUMONIA); a screening aid keeps sensitivity and
specificity balanced. (Keeping the stored cut's likelihood ratio on a refitted calibration was tried
first: on the simulated sites it overshot, buying specificity with too much sensitivity.) Models whose
rule is ``fixed`` (0.5) get 0.5 on the site's probabilities, and ``target_sensitivity=`` picks the cut
from the site's PNEUMONIA films.

**Few films.** A site gives tens of films, where a free fit is noise. Each fitted value therefore
replaces the model's stored one only when the films show that it differs (a fixed rule, decided
before the simulation was read):

- calibration (temperature and bias): a score test of the model's own calibration on the labelled
  films (Cox's recalibration test, 2 degrees of freedom, level ``alpha``, 0.01), then a MAP fit with weak
  priors centred on the model's values (``SIGMA_LOG_T``, ``SIGMA_BIAS``) so separable samples stay finite;
- prevalence: a likelihood-ratio test against ``pi_ref`` on the films (labelled ones count as their
  label, unlabelled ones through EM on their posteriors), then the (lightly smoothed) maximum likelihood.

Under a site where the model is already right, a change happens in about ``alpha`` of samples, so the
10th percentile of any metric over samples is the model's own; where it is wrong, the change comes as
soon as a few films show it. ``benchmarks/site_simulation.py`` measures both. Without labels only the
prevalence moves, and decisions never change; but EM reads any change of the films' scores as a change
of prevalence, and an acquisition shift that over-calls NORMAL films or misses PNEUMONIA ones then gets
its wrong calls amplified by the prior shift. So unlabelled films count only when their scores are a
mix of the model's own validation classes (:class:`ReferenceScores`, :func:`mixture_test`: a G-test of
their binned calibrated logits against ``pi * p1 + (1 - pi) * p0`` at EM's prevalence, level ``MIXTURE_ALPHA``, 0.2: a false alarm
only keeps the reference, a miss amplifies wrong calls);
a model without a reference distribution lets them move nothing. A shift that makes NORMAL films look
exactly like the validation's PNEUMONIA ones stays invisible to any test without labels; the report
also shows the share of films flagged out of distribution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from xray.core.config_checks import is_num
from xray.core.constants import CLASSES
from xray.evaluation import plots
from xray.evaluation.calibration import T_MAX, T_MIN
from xray.evaluation.metrics import bootstrap_ci, classification_metrics, expected_calibration_error
from xray.evaluation.report import fmt_ci, fmt_num, md_table

KERMANY_PREVALENCE = 3875 / 5216
"""PNEUMONIA share of the Kermany training split, where every model here fitted its temperature."""

THRESHOLD_RULES = ("youden", "sensitivity", "fixed")
PREVALENCE_MODES = ("auto", "unlabelled", "reference")
"""``prevalence=``: a number, or ``auto`` (every film: labelled ones by label, unlabelled by EM),
``unlabelled`` (EM on the unlabelled films only: for a labelled set picked per class) or ``reference``
(no prior shift)."""

UNLABELLED_STATUS = ("none", "used", "not_a_mixture", "no_reference")
"""What became of a site's unlabelled films in the prevalence: none there (or a fixed prevalence), used by
EM, left out because their scores are not a mix of the validation's classes, left out because the model
carries no reference score distribution to check that against."""

UNLABELLED_NOTE = {
    "not_a_mixture": "; the unlabelled films were left out: their scores are not a mix of the validation's classes",
    "no_reference": "; the unlabelled films were left out: the model carries no reference score distribution",
}

ALPHA = 0.01  # level of the keep-unless-shown tests (0.05 changed too often on the simulated null sites)
# Level of the mixture guard on unlabelled films. Its errors cost unequally: a false alarm only keeps the
# reference prevalence (the model as shipped), a miss applies a prior shift that amplifies wrong calls
# (real fold runs, k = 0, 74%: worst-decile log loss 0.884 -> 1.288 at 0.01, 0.902 at 0.2).
MIXTURE_ALPHA = 0.2
SIGMA_LOG_T = 1.0  # prior sd of log(T_site / T_model): weak, keeps a separable sample's fit finite
SIGMA_BIAS = 2.0  # prior sd of the calibration bias (logit units)
MIN_PER_CLASS = 20  # fewer labelled films of a class: a warning (its rate is known to about +-0.2)
AUROC_DROP = 0.05  # site AUROC this far under validation (and its interval too): "does not fit"
AUROC_FLOOR = 0.80  # without a validation figure: a site AUROC whose whole interval is under this
REFERENCE_EDGES = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0)
"""Inner edges of the reference score bins on the calibrated logit ``z / T`` (10 bins, open ends): one logit
wide where a model's films are uncertain, which is where acquisition shifts put the films they
misread; beyond +-4 (posterior above 0.98 at the reference prevalence) one open bin per side, because
the confident modes differ between fold models and an ensemble (bins there would test that, not the
site). Out to +-8 in steps of 2, the clean sites of the real fold runs were refused in 16% of draws."""
REFERENCE_SMOOTHING = 0.5  # films added to every reference bin of each class: no empty bin, no infinite G
_EM_ITERATIONS = 2000
_NEWTON_ITERATIONS = 60
_MIXTURE_ITERATIONS = 500


# --------------------------------------------------------------------------------------------- basics
def logodds(p: float | Tensor) -> Any:
    """log(p / (1 - p)); +-inf at 1 and 0."""
    if isinstance(p, Tensor):
        return torch.logit(p.double())
    p = float(p)
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def prior_shift(logits: Tensor, prevalence: float, reference: float) -> Tensor:
    """Calibrated logits at prevalence ``reference`` moved to ``prevalence`` (Bayes' rule: the
    likelihood ratio of a film is unchanged, only the prior odds change)."""
    return logits.double() + (logodds(prevalence) - logodds(reference))


def chi2_critical(df: int, alpha: float) -> float:
    """The (1 - alpha) quantile of chi-squared with ``df`` degrees of freedom (closed forms for 1 and 2,
    else bisection on the regularised incomplete gamma function, to 1e-10)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if df == 1:
        q = float(torch.special.ndtri(torch.tensor(1.0 - alpha / 2.0, dtype=torch.float64)))
        return q * q
    if df == 2:
        return -2.0 * math.log(alpha)
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df}")
    half = torch.tensor(df / 2.0, dtype=torch.float64)
    low, high = 0.0, float(df) + 20.0 * math.sqrt(2.0 * df) + 100.0
    while high - low > 1e-10 * max(1.0, high):
        mid = 0.5 * (low + high)
        survival = float(torch.special.gammaincc(half, torch.tensor(mid / 2.0, dtype=torch.float64)))
        low, high = (mid, high) if survival > alpha else (low, mid)
    return 0.5 * (low + high)


def _bce(eta: Tensor, y: Tensor) -> Tensor:
    """Elementwise binary cross-entropy of logits ``eta`` (stable for any magnitude)."""
    return F.softplus(eta) - y * eta


def _rows(x: Tensor) -> Tensor:
    """Films as batch rows: (n,) -> (1, n) (shared by every row), (B, m) as it is; float64."""
    x = x.double()
    return x[None, :] if x.dim() == 1 else x


@dataclass(frozen=True)
class ReferenceScores:
    """The model's per-class distribution of calibrated logits ``z / temperature`` on its own validation
    films (for fold models: the pooled clean out-of-fold ones), as counts over fixed bins. Under a pure
    change of prevalence a site's films are a mix of these two distributions; films that are not (an
    acquisition shift, a subgroup the model misreads) must not be read as a prevalence by EM.
    ``ensemble.json`` stores it under ``reference_scores`` (:meth:`to_json`)."""

    edges: tuple[float, ...]  # inner bin edges; the first and last bins are open
    normal: tuple[float, ...]  # NORMAL films per bin
    pneumonia: tuple[float, ...]  # PNEUMONIA films per bin
    temperature: float  # the T of z / T when the counts were taken

    def __post_init__(self) -> None:
        edges = list(self.edges)
        if len(edges) < 2 or not all(is_num(e) and math.isfinite(e) for e in edges):
            raise ValueError(f"edges must be two or more finite numbers, got {edges!r}")
        if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"edges must increase strictly, got {edges!r}")
        for name, counts in (("NORMAL", self.normal), ("PNEUMONIA", self.pneumonia)):
            counts = list(counts)
            if len(counts) != len(edges) + 1:
                raise ValueError(f"{name} must hold {len(edges) + 1} counts (one per bin), got {len(counts)}")
            if not all(is_num(c) and math.isfinite(c) and c >= 0 for c in counts):
                raise ValueError(f"{name} counts must be finite numbers >= 0, got {counts!r}")
            if sum(counts) <= 0:
                raise ValueError(f"{name} counts are all 0: no {name} films were binned")
        if not is_num(self.temperature) or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")

    @property
    def bins(self) -> int:
        return len(self.edges) + 1

    @property
    def df(self) -> int:
        """Degrees of freedom of the mixture test: bins - 1, less one for the fitted prevalence."""
        return self.bins - 2

    @classmethod
    def from_logits(
        cls, logits: Tensor, labels: Tensor, temperature: float, edges: Sequence[float] = REFERENCE_EDGES
    ) -> ReferenceScores:
        """Bin raw logits (0/1 labels) at ``temperature``."""
        labels = labels.reshape(-1).long()
        s = logits.double().reshape(-1) / float(temperature)
        bounds = torch.tensor(list(edges), dtype=torch.float64)
        counts = [
            torch.bincount(torch.bucketize(s[labels == k], bounds), minlength=len(edges) + 1).tolist()
            for k in (0, 1)
        ]
        return cls(tuple(float(e) for e in edges), tuple(counts[0]), tuple(counts[1]), float(temperature))

    def to_json(self) -> dict[str, Any]:
        return {
            "edges": list(self.edges),
            CLASSES[0]: list(self.normal),
            CLASSES[1]: list(self.pneumonia),
            "temperature": self.temperature,
            "scale": "calibrated logit z / temperature; the first and last bins are open",
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "reference_scores") -> ReferenceScores:
        """Checked; a ``ValueError`` naming ``where`` and what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be an object with edges, {CLASSES[0]}, {CLASSES[1]}, temperature")
        missing = [k for k in ("edges", *CLASSES, "temperature") if k not in data]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        lists = [data["edges"], data[CLASSES[0]], data[CLASSES[1]]]
        if not all(isinstance(v, list) for v in lists):
            raise ValueError(f"{where}: edges, {CLASSES[0]} and {CLASSES[1]} must be lists of numbers")
        try:
            return cls(tuple(lists[0]), tuple(lists[1]), tuple(lists[2]), data["temperature"])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def class_distributions(self) -> tuple[Tensor, Tensor]:
        """(p0, p1): each class's share of films per bin, with REFERENCE_SMOOTHING films added per bin."""
        out = []
        for counts in (self.normal, self.pneumonia):
            c = torch.tensor(counts, dtype=torch.float64) + REFERENCE_SMOOTHING
            out.append(c / c.sum())
        return out[0], out[1]

    def histogram(self, s: Tensor, w: Tensor) -> Tensor:
        """(B, bins) weighted counts of calibrated logits ``s`` ((m,) or (B, m)) with weights ``w`` (B, m)."""
        bounds = torch.tensor(list(self.edges), dtype=torch.float64)
        index = torch.bucketize(_rows(s).contiguous(), bounds).expand(w.shape[0], -1)
        counts = torch.zeros(w.shape[0], self.bins, dtype=torch.float64)
        return counts.scatter_add_(1, index, w.double())


def mixture_test(
    counts: Tensor, reference: ReferenceScores, prevalence: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(G statistic, prevalence) per batch row of binned films ``counts`` (B, bins) against the mix
    ``pi * p1 + (1 - pi) * p0`` of the reference's class distributions: at ``prevalence`` (B,) (the
    site fit passes EM's estimate from the same films: the prevalence it would apply), else at pi's
    maximum likelihood on the bins. Either way pi comes from the films, so G is about chi-squared with
    ``reference.df`` = bins - 2 degrees of freedom when they are such a mix. Each bin's deviance is
    divided by ``1 + n (pi^2 p1 / N1 + (1 - pi)^2 p0 / N0) / m``, the variance the reference's own
    sampling adds (N0, N1 its films per class): negligible for 100 films against thousands, it keeps a
    site as large as the validation from being refused for the reference's noise. nan where a row has
    no films."""
    p0, p1 = reference.class_distributions()
    counts = counts.double()
    n = counts.sum(1)
    pi = torch.full_like(n, 0.5)
    for _ in range(_MIXTURE_ITERATIONS if prevalence is None else 0):
        mix = pi[:, None] * p1 + (1 - pi[:, None]) * p0
        new = (counts * pi[:, None] * p1 / mix).sum(1) / n.clamp_min(1e-300)
        done = bool(((new - pi).abs() < 1e-10).all())
        pi = new
        if done:
            break
    if prevalence is not None:
        pi = prevalence.double().expand_as(n)
    a, b = pi[:, None], 1 - pi[:, None]
    mix = (a * p1 + b * p0).clamp_min(1e-300)
    expected = n[:, None] * mix
    deviance = 2.0 * (torch.xlogy(counts, counts) - counts * expected.log() - (counts - expected))
    # the reference is a sample too: each bin's deviance over its variance inflation (two samples)
    n0 = sum(reference.normal) + REFERENCE_SMOOTHING * reference.bins
    n1 = sum(reference.pneumonia) + REFERENCE_SMOOTHING * reference.bins
    inflation = 1.0 + n[:, None] * (a * a * p1 / n1 + b * b * p0 / n0) / mix
    stat = (deviance.clamp_min(0.0) / inflation).sum(1)
    stat = torch.where(n > 0, stat, torch.full_like(stat, math.nan))
    return stat, pi


@dataclass(frozen=True)
class ModelReference:
    """The model as shipped: ``sigmoid(z / temperature) >= threshold`` at ``reference_prevalence``, and
    its validation's score distribution (None: the model carries none, so unlabelled films cannot be
    checked for a shift other than prevalence)."""

    temperature: float
    threshold: float
    reference_prevalence: float = KERMANY_PREVALENCE
    rule: str = "youden"
    reference_scores: ReferenceScores | None = None

    def __post_init__(self) -> None:
        if self.reference_scores is not None and not isinstance(self.reference_scores, ReferenceScores):
            raise ValueError(f"reference_scores must be a ReferenceScores, got {type(self.reference_scores)}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 < self.reference_prevalence < 1.0:
            raise ValueError(f"reference prevalence must be in (0, 1), got {self.reference_prevalence}")
        if self.rule not in THRESHOLD_RULES:
            raise ValueError(f"rule must be one of {THRESHOLD_RULES}, got {self.rule!r}")

    @property
    def cut(self) -> float:
        """The stored operating point on the calibrated logit scale at the reference prevalence."""
        return logodds(self.threshold)

    def probs(self, logits: Tensor) -> Tensor:
        """The model's own P(PNEUMONIA) (float64)."""
        return torch.sigmoid(logits.double() / self.temperature)


def rule_of(threshold_rule: str | None) -> str:
    """The site rule for a model's stored ``threshold_rule`` text (``shift_youden on pooled ...``)."""
    text = (threshold_rule or "youden").strip().lower()
    for rule in ("sensitivity", "fixed"):
        if text.startswith(rule):
            return rule
    return "youden"


# ------------------------------------------------------------------------------------ batched fitting
def calibration_score_test(z: Tensor, y: Tensor, w: Tensor, offset: Tensor, temperature: float) -> Tensor:
    """Score (Rao) statistic of "the model's calibration holds" against ``s / T' + bias`` per batch row:
    gradient and Fisher information at the model's values, so a separable sample (whose free fit runs
    off to T = 0) is judged without fitting. ``z``, ``y``: (n,) or (B, m); ``w`` (B, m); ``offset`` (B,)."""
    s = _rows(z) / temperature
    p = torch.sigmoid(s + offset[:, None])
    r = w * (_rows(y) - p)
    h = w * p * (1.0 - p)
    u = torch.stack([(r * s).sum(1), r.sum(1)], dim=1)  # (B, 2): d/dlog(a), d/dbias
    i_ss, i_s1, i_11 = (h * s * s).sum(1), (h * s).sum(1), h.sum(1)
    ridge = 1e-12 * (1.0 + i_ss + i_11)
    i_ss, i_11 = i_ss + ridge, i_11 + ridge
    det = i_ss * i_11 - i_s1 * i_s1
    stat = (u[:, 0] ** 2 * i_11 - 2 * u[:, 0] * u[:, 1] * i_s1 + u[:, 1] ** 2 * i_ss) / det.clamp_min(1e-300)
    return torch.nan_to_num(stat, nan=0.0, posinf=1e300)


def fit_calibration(
    z: Tensor,
    y: Tensor,
    w: Tensor,
    offset: Tensor,
    temperature: float,
    sigma_log_t: float = SIGMA_LOG_T,
    sigma_bias: float = SIGMA_BIAS,
) -> tuple[Tensor, Tensor]:
    """MAP (T_site, bias) per batch row of ``sum w * BCE(z / T + bias + offset, y)`` with Gaussian priors
    on log(T / temperature) and bias; Newton steps (Gauss-Newton where the Hessian is not positive)
    with backtracking, in float64. T is kept within the project's [T_MIN, T_MAX]."""
    z, y, w = _rows(z), _rows(y), w.double()
    u0 = -math.log(temperature)  # u = log(1 / T)
    lo, hi = -math.log(T_MAX), -math.log(T_MIN)
    batch = w.shape[0]
    u = torch.full((batch,), u0, dtype=torch.float64)
    b = torch.zeros(batch, dtype=torch.float64)
    o = offset.double()

    def objective(u: Tensor, b: Tensor) -> Tensor:
        eta = u.exp()[:, None] * z + (b + o)[:, None]
        return (w * _bce(eta, y)).sum(1) + 0.5 * ((u - u0) / sigma_log_t) ** 2 + 0.5 * (b / sigma_bias) ** 2

    f = objective(u, b)
    for _ in range(_NEWTON_ITERATIONS):
        a = u.exp()[:, None]
        az = a * z
        p = torch.sigmoid(az + (b + o)[:, None])
        r, h = w * (p - y), w * p * (1.0 - p)
        g_u = (r * az).sum(1) + (u - u0) / sigma_log_t**2
        g_b = r.sum(1) + b / sigma_bias**2
        h_ub, h_bb = (h * az).sum(1), h.sum(1) + 1.0 / sigma_bias**2
        h_gn = (h * az * az).sum(1) + 1.0 / sigma_log_t**2
        h_full = h_gn + (r * az).sum(1)
        use_full = (h_full > 0) & (h_full * h_bb - h_ub**2 > 0)
        h_uu = torch.where(use_full, h_full, h_gn)
        det = (h_uu * h_bb - h_ub**2).clamp_min(1e-300)
        du, db = -(h_bb * g_u - h_ub * g_b) / det, -(h_uu * g_b - h_ub * g_u) / det
        step = torch.ones(batch, dtype=torch.float64)
        slope = g_u * du + g_b * db
        accepted = torch.zeros(batch, dtype=torch.bool)
        for _ in range(40):
            nu, nb = (u + step * du).clamp(lo, hi), b + step * db
            nf = objective(nu, nb)
            ok = (nf <= f + 1e-4 * step * slope) | (nf <= f)
            newly = ok & ~accepted
            u, b, f = torch.where(newly, nu, u), torch.where(newly, nb, b), torch.where(newly, nf, f)
            accepted |= ok
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step / 2)
        if float((step * (du.abs() + db.abs())).max()) < 1e-9:
            break
    return 1.0 / u.exp(), b


def em_prevalence(
    s: Tensor, y: Tensor, w_lab: Tensor, w_unl: Tensor, reference: float
) -> tuple[Tensor, Tensor]:
    """Prevalence per batch row from labelled films (their labels) and unlabelled ones (EM on their
    posteriors, Saerens et al. 2002), with half a film of each class added so 0 and 1 never come out;
    and the likelihood-ratio statistic of ``reference`` against it. ``s`` (calibrated logits at the
    reference prevalence) and ``y``: (n,) or (B, m), like the weights."""
    u = _rows(s) - logodds(reference)  # log likelihood ratio of each film
    w_lab, w_unl = w_lab.double(), w_unl.double()
    n1 = (w_lab * _rows(y)).sum(1)
    n_lab, n_unl = w_lab.sum(1), w_unl.sum(1)
    total = n_lab + n_unl
    pi = ((n1 + 0.5) / (n_lab + 1.0)).where(n_lab > 0, torch.full_like(n1, reference))
    if bool((n_unl > 0).any()):
        for _ in range(_EM_ITERATIONS):
            post = torch.sigmoid(u + logodds(pi)[:, None])
            new = (n1 + (w_unl * post).sum(1) + 0.5) / (total + 1.0)
            done = bool(((new - pi).abs() < 1e-12).all())
            pi = new
            if done:
                break
    pi = torch.where(total > 0, pi, torch.full_like(pi, reference))

    def loglik(p: Tensor) -> Tensor:
        p = p.clamp(1e-300, 1 - 1e-16)
        lab = n1 * p.log() + (n_lab - n1) * torch.log1p(-p)
        mix = torch.logaddexp(p.log()[:, None] + u, torch.log1p(-p)[:, None])
        return lab + (w_unl * mix).sum(1)

    stat = 2.0 * (loglik(pi) - loglik(torch.full_like(pi, reference))).clamp_min(0.0)
    return pi, stat


def _sensitivity_cut(s: Tensor, y: Tensor, w: Tensor, target: float, fallback: float) -> Tensor:
    """The largest cut on ``s`` keeping a (weighted) share >= ``target`` of the labelled PNEUMONIA films
    at or above it, per batch row; ``fallback`` where a row has none."""
    s = _rows(s).expand(w.shape[0], -1)
    wp = w.double() * (_rows(y) == 1)
    order = torch.argsort(s, dim=1, descending=True)
    s_sorted, w_sorted = s.gather(1, order), wp.gather(1, order)
    total = w_sorted.sum(1, keepdim=True)
    share = w_sorted.cumsum(1) / total.clamp_min(1e-300)
    reached = (share >= target - 1e-12) & (w_sorted > 0)
    first = torch.argmax(reached.double(), dim=1)
    cut = s_sorted.gather(1, first[:, None])[:, 0]
    return torch.where(total[:, 0] > 0, cut, torch.full_like(cut, fallback))


@dataclass
class SiteFitBatch:
    """One fit per batch row (each a tensor (B,)); see :func:`fit_batch`."""

    temperature: Tensor
    bias: Tensor
    prevalence: Tensor
    cut: Tensor  # on s = z / T + bias, the calibrated logit at the reference prevalence
    calibration_changed: Tensor
    prevalence_changed: Tensor
    calibration_stat: Tensor
    prevalence_stat: Tensor
    reference_prevalence: float
    mixture_stat: Tensor | None = None  # G of the unlabelled films against the reference mix (nan: untested)
    unlabelled: Tensor | None = None  # index into UNLABELLED_STATUS: what became of the unlabelled films
    mixture_df: int | None = None

    @property
    def shift(self) -> Tensor:
        """logodds(pi_site) - logodds(pi_ref): the prior-shift term added to every logit."""
        return logodds(self.prevalence) - logodds(self.reference_prevalence)

    @property
    def offset(self) -> Tensor:
        """Added to z / T: bias + the prior shift."""
        return self.bias + self.shift

    @property
    def threshold(self) -> Tensor:
        """The cut as a threshold on the site's probability."""
        return torch.sigmoid(self.cut + self.shift)

    def logits(self, z: Tensor) -> Tensor:
        """(B, n) site logits at the site's prevalence."""
        return z.double()[None, :] / self.temperature[:, None] + self.offset[:, None]

    def decisions(self, z: Tensor) -> Tensor:
        """(B, n) PNEUMONIA calls (compared on the calibrated scale, where the cut is exact)."""
        return (z.double()[None, :] / self.temperature[:, None] + self.bias[:, None]) >= self.cut[:, None]


def fit_batch(
    z: Tensor,
    y: Tensor,
    w_lab: Tensor,
    w_unl: Tensor,
    model: ModelReference,
    *,
    alpha: float = ALPHA,
    prevalence: str | float = "auto",
    target_sensitivity: float | None = None,
    pretest: bool = True,
) -> SiteFitBatch:
    """The site profile's values for each row of weights: ``w_lab`` (B, m) the labelled films used (bootstrap
    counts allowed), ``w_unl`` (B, m) the unlabelled ones; ``z`` and ``y`` (-1: unlabelled) are (m,), shared
    by the rows, or (B, m), each row its own films. ``pretest=False`` always takes the fitted values
    (bootstrap intervals describe those); True applies the module's keep-unless-shown rule, and lets the
    unlabelled films into the prevalence only where the model carries a reference score distribution
    and their scores pass the :func:`mixture_test` at level ``alpha`` (else they are left out: EM
    would read a shift of the scores as a prevalence)."""
    z, y = _rows(z), _rows(y)
    w_lab, w_unl = w_lab.double(), w_unl.double()
    y01 = y.clamp(0, 1)
    ref = model.reference_prevalence
    n1 = (w_lab * y01).sum(1)
    n0 = (w_lab * (1 - y01)).sum(1)
    both = (n1 > 0) & (n0 > 0)
    sample_pi = (n1 / (n1 + n0).clamp_min(1e-300)).clamp(1e-6, 1 - 1e-6)
    offset_lab = torch.where(both, logodds(sample_pi) - logodds(ref), torch.zeros_like(n1))

    calib_stat = calibration_score_test(z, y01, w_lab, offset_lab, model.temperature)
    calib_stat = torch.where(both, calib_stat, torch.zeros_like(calib_stat))
    fit_t, fit_b = fit_calibration(z, y01, w_lab, offset_lab, model.temperature)
    change = both & (calib_stat > chi2_critical(2, alpha)) if pretest else both
    temperature = torch.where(change, fit_t, torch.full_like(fit_t, model.temperature))
    bias = torch.where(change, fit_b, torch.zeros_like(fit_b))

    s = z / temperature[:, None] + bias[:, None]
    if isinstance(prevalence, str) and prevalence not in PREVALENCE_MODES:
        raise ValueError(
            f"prevalence must be a number in (0, 1) or one of {PREVALENCE_MODES}, got {prevalence!r}"
        )
    scores = model.reference_scores
    mixture_stat = torch.full_like(n1, math.nan)
    status = torch.zeros(n1.shape, dtype=torch.long)  # "none"
    if not isinstance(prevalence, str):
        pi = torch.full_like(n1, float(prevalence))
        prev_stat, prev_change = torch.full_like(n1, math.nan), torch.ones_like(both)
    elif prevalence == "reference":
        pi = torch.full_like(n1, ref)
        prev_stat, prev_change = torch.zeros_like(n1), torch.zeros_like(both)
    else:
        lab = w_lab if prevalence == "auto" else torch.zeros_like(w_lab)
        has_unl = w_unl.sum(1) > 0
        pi_hat, prev_stat = em_prevalence(s, y01, lab, w_unl, ref)
        keep = torch.ones_like(has_unl)
        if scores is not None and bool(has_unl.any()):
            # the unlabelled films on the reference's scale (x 1 unless the model's T was refitted since),
            # against the mix at the prevalence EM would apply
            counts = scores.histogram(s * (model.temperature / scores.temperature), w_unl)
            mixture_stat = torch.where(has_unl, mixture_test(counts, scores, pi_hat)[0], mixture_stat)
            if pretest:
                keep = ~(mixture_stat > chi2_critical(scores.df, MIXTURE_ALPHA))
        elif scores is None and pretest:
            keep = torch.zeros_like(has_unl)
        status = torch.where(has_unl, torch.where(keep, 1, 2 if scores is not None else 3), status)
        if bool((has_unl & ~keep).any()):  # EM again without the unlabelled films it may not read
            pi_kept, stat_kept = em_prevalence(s, y01, lab, w_unl * keep[:, None], ref)
            pi_hat, prev_stat = torch.where(keep, pi_hat, pi_kept), torch.where(keep, prev_stat, stat_kept)
        prev_change = prev_stat > chi2_critical(1, alpha) if pretest else torch.ones_like(both)
        pi = torch.where(prev_change, pi_hat, torch.full_like(pi_hat, ref))

    shift = logodds(pi) - logodds(ref)
    if target_sensitivity is not None:
        cut = _sensitivity_cut(s, y01, w_lab, float(target_sensitivity), model.cut)
    elif model.rule == "fixed":
        cut = -shift  # 0.5 on the site's probability
    else:  # Youden: the refitted calibration's likelihood-ratio-1 point, else the model's own cut
        cut = torch.where(change, torch.full_like(n1, logodds(ref)), torch.full_like(n1, model.cut))
    return SiteFitBatch(
        temperature=temperature,
        bias=bias,
        prevalence=pi,
        cut=cut,
        calibration_changed=change,
        prevalence_changed=prev_change,
        calibration_stat=calib_stat,
        prevalence_stat=prev_stat,
        reference_prevalence=ref,
        mixture_stat=mixture_stat,
        unlabelled=status,
        mixture_df=None if scores is None else scores.df,
    )


# ----------------------------------------------------------------------------------------- one site
@dataclass(frozen=True)
class SiteFit:
    """A site's fitted values (one row of :class:`SiteFitBatch`), plain floats."""

    temperature: float
    bias: float
    prevalence: float
    cut: float
    threshold: float
    offset: float
    reference_prevalence: float
    calibration_changed: bool
    prevalence_changed: bool
    calibration_stat: float
    prevalence_stat: float
    unlabelled: str = "none"  # one of UNLABELLED_STATUS
    mixture_stat: float = math.nan
    mixture_df: int | None = None

    @classmethod
    def from_batch(cls, batch: SiteFitBatch, row: int = 0) -> SiteFit:
        status = 0 if batch.unlabelled is None else int(batch.unlabelled[row])
        mixture = math.nan if batch.mixture_stat is None else float(batch.mixture_stat[row])
        return cls(
            unlabelled=UNLABELLED_STATUS[status],
            mixture_stat=mixture,
            mixture_df=batch.mixture_df,
            temperature=float(batch.temperature[row]),
            bias=float(batch.bias[row]),
            prevalence=float(batch.prevalence[row]),
            cut=float(batch.cut[row]),
            threshold=float(batch.threshold[row]),
            offset=float(batch.offset[row]),
            reference_prevalence=batch.reference_prevalence,
            calibration_changed=bool(batch.calibration_changed[row]),
            prevalence_changed=bool(batch.prevalence_changed[row]),
            calibration_stat=float(batch.calibration_stat[row]),
            prevalence_stat=float(batch.prevalence_stat[row]),
        )

    def probs(self, logits: Tensor) -> Tensor:
        """The site's P(PNEUMONIA) of raw logits (float64)."""
        return torch.sigmoid(logits.double() / self.temperature + self.offset)


@dataclass(frozen=True)
class SiteOptions:
    """How a site is fitted: the significance level of the keep-unless-shown tests, the prevalence
    mode (or a number), an optional target sensitivity, and the bootstrap."""

    alpha: float = ALPHA
    prevalence: str | float = "auto"
    target_sensitivity: float | None = None
    n_bootstrap: int = 1000
    seed: int = 0
    min_per_class: int = MIN_PER_CLASS

    def fit_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`fit_batch` these options set."""
        return {
            "alpha": self.alpha,
            "prevalence": self.prevalence,
            "target_sensitivity": self.target_sensitivity,
        }


def _masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    labelled = labels >= 0
    return labelled.double()[None, :], (~labelled).double()[None, :]


def fit_site(
    z: Tensor, labels: Tensor, model: ModelReference, options: SiteOptions = SiteOptions()
) -> SiteFit:
    """The profile's values for one site: ``labels`` 0/1, or -1 for an unlabelled film."""
    labels = labels.long().reshape(-1)
    w_lab, w_unl = _masks(labels)
    batch = fit_batch(
        z,
        labels,
        w_lab,
        w_unl,
        model,
        **options.fit_settings(),
    )
    return SiteFit.from_batch(batch)


def bootstrap_fit(
    z: Tensor, labels: Tensor, model: ModelReference, options: SiteOptions = SiteOptions()
) -> dict[str, list[float]]:
    """95% percentile intervals of the fitted values (``pretest=False``: what the films say, before
    the keep-unless-shown rule) over bootstrap resamples of the films."""
    labels = labels.long().reshape(-1)
    n = labels.numel()
    gen = torch.Generator().manual_seed(int(options.seed))
    idx = torch.randint(0, n, (int(options.n_bootstrap), n), generator=gen)
    counts = torch.zeros(int(options.n_bootstrap), n, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    labelled = (labels >= 0).double()[None, :]
    batch = fit_batch(
        z,
        labels,
        counts * labelled,
        counts * (1 - labelled),
        model,
        **options.fit_settings(),
        pretest=False,
    )
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    values = {
        "temperature": batch.temperature,
        "bias": batch.bias,
        "prevalence": batch.prevalence,
        "threshold": batch.threshold,
        "cut": batch.cut,
    }
    return {k: torch.quantile(v.double(), q).tolist() for k, v in values.items()}


def cross_fitted(
    z: Tensor, labels: Tensor, model: ModelReference, options: SiteOptions = SiteOptions(), folds: int = 200
) -> tuple[Tensor, Tensor]:
    """(site probabilities, PNEUMONIA calls) of the labelled films, each from a profile fitted without it
    (leave-one-out up to ``folds`` labelled films, else that many interleaved folds): an honest view of
    the profile on the films it was fitted on. Unlabelled films stay in every fit."""
    labels = labels.long().reshape(-1)
    labelled = torch.nonzero(labels >= 0).reshape(-1)
    n_lab = labelled.numel()
    probs = torch.full((labels.numel(),), math.nan, dtype=torch.float64)
    calls = torch.zeros(labels.numel(), dtype=torch.bool)
    if n_lab == 0:
        return probs, calls
    k = min(int(folds), n_lab)
    fold_of = torch.arange(n_lab) % k
    w_lab = torch.zeros(k, labels.numel(), dtype=torch.float64)
    w_lab[:, labelled] = (fold_of[None, :] != torch.arange(k)[:, None]).double()
    w_unl = (labels < 0).double()[None, :].expand(k, -1)
    batch = fit_batch(
        z,
        labels,
        w_lab,
        w_unl,
        model,
        **options.fit_settings(),
    )
    rows = fold_of
    site_logits = batch.logits(z)[rows, labelled]
    probs[labelled] = torch.sigmoid(site_logits)
    calls[labelled] = batch.decisions(z)[rows, labelled]
    return probs, calls


# ------------------------------------------------------------------------------------------- summary
def _log_loss(p: Tensor, y: Tensor) -> float:
    p = p.double().clamp(1e-15, 1 - 1e-15)
    return float(F.binary_cross_entropy(p, y.double()))


def _metrics_with_ci(
    probs: Tensor, calls: Tensor, y: Tensor, options: SiteOptions, ranking: Tensor | None = None
) -> dict[str, Any]:
    """Log loss and ECE from ``probs``, the count metrics from ``calls``, AUROC from ``ranking`` (default
    ``probs``), each rate and the AUROC with a 95% bootstrap interval."""
    ranking = probs if ranking is None else ranking
    point = classification_metrics(calls.double(), y, 0.5)
    ranked = classification_metrics(ranking.double(), y, 0.5)
    boot = dict(n_boot=int(options.n_bootstrap), seed=int(options.seed))
    ci = bootstrap_ci(calls.double(), y, 0.5, metrics=("accuracy", "sensitivity", "specificity"), **boot)
    ci.update(bootstrap_ci(ranking.double(), y, 0.5, metrics=("auroc",), **boot))
    return {
        "accuracy": point["accuracy"],
        "sensitivity": point["sensitivity"],
        "specificity": point["specificity"],
        "auroc": ranked["auroc"],
        "log_loss": _log_loss(probs, y),
        "ece": expected_calibration_error(probs.double(), y),
        "ci": {k: list(v) for k, v in ci.items()},
        "confusion": {k: point[k] for k in ("tn", "fp", "fn", "tp")},
    }


@dataclass
class SiteSummary:
    """What the report says about one site: counts, the fit, metrics before and after, warnings."""

    n: int
    n_normal: int
    n_pneumonia: int
    n_unlabelled: int
    fit: SiteFit
    intervals: dict[str, list[float]]
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)
    options: SiteOptions = field(default_factory=SiteOptions)
    probs_before: Tensor | None = None
    probs_after: Tensor | None = None
    probs_fitted: Tensor | None = None


def sample_warnings(n_normal: int, n_pneumonia: int, options: SiteOptions) -> list[str]:
    """Why the films may be too few for what is asked of them."""
    out = []
    if n_normal + n_pneumonia == 0:
        out.append(
            "no labelled films: only the prevalence is estimated (from the unlabelled films); the "
            "temperature and threshold stay the model's"
        )
        return out
    for name, n, rate in ((CLASSES[0], n_normal, "specificity"), (CLASSES[1], n_pneumonia, "sensitivity")):
        if n < options.min_per_class:
            half = 1.96 * math.sqrt(0.25 / max(n, 1))
            out.append(
                f"only {n} {name} film(s) (fewer than {options.min_per_class}): the site's {rate} is "
                f"known to about +-{min(half, 0.5):.2f}; the profile keeps the model's values unless the films "
                "clearly show a difference"
            )
    target = options.target_sensitivity
    if target is not None and target < 1.0:
        needed = math.ceil(3.0 / (1.0 - target))
        if n_pneumonia < needed:
            out.append(
                f"target_sensitivity={target:g} with {n_pneumonia} PNEUMONIA film(s): showing a sensitivity "
                f"of {target:g} takes at least {needed} with none missed (95% confidence)"
            )
    return out


def unlabelled_warning(fit: SiteFit) -> str | None:
    """Why the unlabelled films did not move the prevalence, in plain words (None when they could)."""
    if fit.unlabelled == "not_a_mixture":
        df = fit.mixture_df or 1
        return (
            "the unlabelled films' scores are not a mix of the model's validation NORMAL and PNEUMONIA films "
            f"(G = {fit.mixture_stat:.1f} on {df} degrees of freedom, above {chi2_critical(df, MIXTURE_ALPHA):.1f}): "
            "something other than the prevalence differs here (acquisition, equipment, a group of films the "
            "model misreads), and without labels recalibration cannot tell that from a change of "
            "prevalence, so they do not move it; label some films to fit this site"
        )
    if fit.unlabelled == "no_reference":
        return (
            "the model carries no reference score distribution (a single checkpoint, or an ensemble.json "
            "written without one: add it with python -m xray.cv RUNS --reference-into FOLDER), so the "
            "unlabelled films cannot be checked for a shift other than prevalence and do not move it; "
            "label some films, or give prevalence= a number"
        )
    return None


def summarise_site(
    z: Tensor, labels: Tensor, model: ModelReference, options: SiteOptions = SiteOptions()
) -> SiteSummary:
    """Fit the site, bootstrap the fitted values, and score the labelled films before (the model as
    shipped) and after (cross-fitted profile)."""
    labels = labels.long().reshape(-1)
    z = z.double().reshape(-1)
    if z.numel() != labels.numel() or z.numel() == 0:
        raise ValueError(f"logits and labels differ in size or are empty: {z.numel()} vs {labels.numel()}")
    fit = fit_site(z, labels, model, options)
    intervals = bootstrap_fit(z, labels, model, options)
    n_normal, n_pneu = int((labels == 0).sum()), int((labels == 1).sum())
    summary = SiteSummary(
        n=int(labels.numel()),
        n_normal=n_normal,
        n_pneumonia=n_pneu,
        n_unlabelled=int((labels < 0).sum()),
        fit=fit,
        intervals=intervals,
        before=None,
        after=None,
        warnings=sample_warnings(n_normal, n_pneu, options),
        options=options,
        probs_fitted=fit.probs(z),
    )
    note = unlabelled_warning(fit)
    if note is not None:
        summary.warnings.append(note)
    lab = labels >= 0
    if n_normal and n_pneu:
        y = labels[lab]
        p0 = model.probs(z[lab])
        summary.before = _metrics_with_ci(p0, p0 >= model.threshold, y, options)
        p_cf, calls = cross_fitted(z, labels, model, options)
        # a profile is monotone: the ranking (AUROC) is the model's; per-film refits would only blur it
        summary.after = _metrics_with_ci(p_cf[lab], calls[lab], y, options, ranking=p0)
        summary.probs_before, summary.probs_after = p0, p_cf[lab]
    return summary


def verdict(summary: SiteSummary, validation_auroc: float | None) -> tuple[str, str]:
    """(kind, plain sentence): ``no_fit`` when the site's AUROC is much lower than validation (the
    model ranks these films worse; recalibration cannot fix that), ``unclear``, ``recalibrated``,
    ``unchanged`` or ``prevalence_only``."""
    fit = summary.fit
    if summary.before is None:
        if fit.prevalence_changed:
            return "prevalence_only", (
                f"Without labels only the prevalence can be estimated: {fit.prevalence:.2f} against the "
                f"model's {fit.reference_prevalence:.2f}; the profile moves the probabilities to it and keeps "
                "the model's decisions. Label some films to check how well the model fits this site."
            )
        if fit.unlabelled == "not_a_mixture":
            return "unchanged", (
                "The films' scores are not a mix of the model's validation classes: they differ in some other "
                "way than the prevalence (acquisition, equipment, films the model misreads), which "
                "recalibration without labels cannot tell apart from a prevalence change, so the profile "
                f"keeps the model's prevalence {fit.reference_prevalence:.2f} and changes nothing. Label some "
                "films to check and fit this site."
            )
        if fit.unlabelled == "no_reference":
            return "unchanged", (
                "The model carries no reference score distribution to check unlabelled films against, so "
                f"they do not move the prevalence ({fit.reference_prevalence:.2f} stays) and the profile "
                "changes nothing. Label some films, or give the prevalence as a number."
            )
        return "unchanged", (
            "Without labels only the prevalence can be estimated, and the films do not show that it differs "
            f"from the model's {fit.reference_prevalence:.2f}: the profile changes nothing."
        )
    auroc = summary.before["auroc"]
    high = summary.before["ci"]["auroc"][1]
    if validation_auroc is None and math.isfinite(high) and high < AUROC_FLOOR:
        return "no_fit", (
            f"The model does not fit this site: it ranks these films poorly (AUROC {auroc:.3f}, 95% interval "
            f"up to {high:.3f}; the model records no validation figure to compare with). A site profile only "
            "moves probabilities and the threshold; it cannot restore the ranking. Do not rely on this model "
            "here without retraining on films like these."
        )
    if validation_auroc is not None and math.isfinite(auroc):
        drop = validation_auroc - auroc
        if drop >= AUROC_DROP and high < validation_auroc:
            return "no_fit", (
                f"The model does not fit this site: it ranks these films much worse than in validation "
                f"(AUROC {auroc:.3f}, 95% interval up to {high:.3f}, against {validation_auroc:.3f}). A site "
                "profile only moves probabilities and the threshold; it cannot restore the ranking. Do not "
                "rely on this model here without retraining on films like these."
            )
        if drop >= AUROC_DROP:
            return "unclear", (
                f"The site's AUROC ({auroc:.3f}) is well under validation ({validation_auroc:.3f}), but with "
                f"these few films its interval reaches {high:.3f}: label more films before trusting the model here."
            )
    changed = []
    if fit.calibration_changed:
        changed.append(f"the calibration (temperature {fit.temperature:.3f}, bias {fit.bias:+.2f})")
    if fit.prevalence_changed:
        changed.append(f"the prevalence ({fit.prevalence:.2f})")
    if not changed:
        return "unchanged", (
            "The films agree with the model's own calibration and prevalence: the profile keeps the model's "
            "values (the site's figures are in the table)."
        )
    ranks = (
        f"The model ranks this site's films about as well as in validation (AUROC {auroc:.3f} against "
        f"{validation_auroc:.3f})"
        if validation_auroc is not None
        else f"The model ranks this site's films with AUROC {auroc:.3f} (no validation figure to compare with)"
    )
    return "recalibrated", (
        f"{ranks}; the films show that {' and '.join(changed)} differ from the model's, so the profile "
        f"corrects them and the threshold becomes {fit.threshold:.3f}."
    )


def site_figures(summary: SiteSummary, model: ModelReference, labels: Tensor) -> dict[str, Figure]:
    """Calibration before / after and the ROC with both operating points (labelled films only)."""
    if summary.probs_before is None or summary.probs_after is None:
        return {}
    y = labels[labels >= 0]
    fitted = summary.probs_fitted[labels >= 0] if summary.probs_fitted is not None else summary.probs_after
    return {
        "site_calibration_before": plots.make_calibration_figure(
            summary.probs_before, y, title="Calibration at the site: the model as shipped"
        ),
        "site_calibration_after": plots.make_calibration_figure(
            summary.probs_after, y, title="Calibration at the site: with the profile (cross-fitted)"
        ),
        "site_roc": plots.make_roc_figure(
            {"model threshold": (summary.probs_before, y), "site profile": (fitted, y)},
            thresholds={"model threshold": model.threshold, "site profile": summary.fit.threshold},
            title="ROC at the site (both operating points)",
        ),
    }


def render_site_report(
    summary: SiteSummary,
    model: ModelReference,
    *,
    title: str = "Site calibration report",
    header: Mapping[str, str] | None = None,
    validation: Mapping[str, Any] | None = None,
    ood: Mapping[str, Any] | None = None,
    verdict_text: str = "",
    figures: Sequence[str] = (),
) -> str:
    """site_report.md: verdict, films, fitted values, site vs validation, calibration, OOD share, figures."""
    fit = summary.fit
    lines = [f"# {title}", ""]
    for key, value in (header or {}).items():
        lines.append(f"- {key}: {value}")
    lines += ["", "## Verdict", "", verdict_text or "(none)", ""]
    if summary.warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in summary.warnings], ""]
    lines += [
        "## Films",
        "",
        *md_table(
            ["films", "NORMAL", "PNEUMONIA", "unlabelled", "prevalence (profile)", "prevalence (model)"],
            [
                [
                    str(summary.n),
                    str(summary.n_normal),
                    str(summary.n_pneumonia),
                    str(summary.n_unlabelled),
                    f"{fit.prevalence:.3f}",
                    f"{fit.reference_prevalence:.3f}",
                ]
            ],
        ),
        "",
        "## The profile",
        "",
    ]

    if summary.options.target_sensitivity is not None:
        threshold_note = f"keeps {summary.options.target_sensitivity:g} of the site's PNEUMONIA films"
    elif fit.calibration_changed and model.rule == "youden":
        threshold_note = "Youden's point (likelihood ratio 1) of the site's calibration"
    else:
        threshold_note = "the model's decisions, on the site's probability scale"

    def kept(changed: bool) -> str:
        return (
            "fitted (the films show it differs)"
            if changed
            else "the model's (the films do not show a difference)"
        )

    def interval(name: str, digits: int = 3) -> str:
        ci = summary.intervals.get(name)
        if ci is None or len(ci) != 2 or not all(math.isfinite(c) for c in ci):
            return "–"
        return f"{ci[0]:.{digits}f} to {ci[1]:.{digits}f}"

    rows = [
        [
            "temperature (raw logits)",
            f"{model.temperature:.3f}",
            f"{fit.temperature:.3f}",
            interval("temperature"),
            kept(fit.calibration_changed),
        ],
        ["bias (logit)", "0", f"{fit.bias:.2f}", interval("bias", 2), kept(fit.calibration_changed)],
        [
            "prevalence",
            f"{fit.reference_prevalence:.3f}",
            f"{fit.prevalence:.3f}",
            interval("prevalence"),
            kept(fit.prevalence_changed) + UNLABELLED_NOTE.get(fit.unlabelled, ""),
        ],
        [
            "threshold (on the site's probability)",
            f"{model.threshold:.3f}",
            f"{fit.threshold:.3f}",
            interval("threshold"),
            threshold_note,
        ],
    ]
    header = [
        "value",
        "model",
        "profile",
        "the site's own fit, 95% bootstrap interval",
        "the profile's value is",
    ]
    lines += md_table(header, rows, "lrrrl")
    lines += [
        "",
        "The interval is what the films alone say (refitted on bootstrap resamples, no test); the profile "
        "keeps the model's value unless the test below shows the films differ.",
    ]
    lines += [
        "",
        f"Tests at level {summary.options.alpha:g}: calibration score statistic {fit.calibration_stat:.2f} "
        f"(fitted above {chi2_critical(2, summary.options.alpha):.2f}), prevalence likelihood ratio "
        f"{fmt_num(fit.prevalence_stat, 2)} (fitted above {chi2_critical(1, summary.options.alpha):.2f})"
        + (
            f"; unlabelled films against the validation's mix of classes G {fmt_num(fit.mixture_stat, 2)} "
            f"(left out above {chi2_critical(fit.mixture_df, MIXTURE_ALPHA):.2f}, level {MIXTURE_ALPHA:g})."
            if fit.mixture_df is not None and math.isfinite(fit.mixture_stat)
            else "."
        ),
        "",
    ]
    if summary.before is not None and summary.after is not None:
        lines += ["## The site against the model's validation", ""]
        val = validation or {}
        val_ci = val.get("ci") or {}
        rows = []
        for key, name in (
            ("auroc", "AUROC"),
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
            ("accuracy", "accuracy"),
            ("log_loss", "log loss"),
            ("ece", "ECE"),
        ):
            rows.append(
                [
                    name,
                    fmt_ci(val.get(key), val_ci.get(key)) if val.get(key) is not None else "–",
                    fmt_ci(summary.before[key], summary.before["ci"].get(key)),
                    fmt_ci(summary.after[key], summary.after["ci"].get(key)),
                ]
            )
        lines += md_table(
            [
                "metric",
                f"validation ({val.get('source', 'not recorded')})",
                "site: model as shipped",
                "site: with the profile",
            ],
            rows,
        )
        lines += [
            "",
            'Site columns: the labelled films; 95% percentile bootstrap intervals over films. "With the '
            'profile" is cross-fitted: each film is scored by a profile fitted without it, so it is not '
            "flattered by the fit. Probabilities after the profile are at the site's prevalence.",
            "",
        ]
    if ood:
        lines += [
            "## Out of distribution",
            "",
            f"{ood.get('flagged', 0)} of {ood.get('n', 0)} films ({100 * ood.get('share', 0.0):.0f}%) are flagged "
            f"outside the training distribution; about {100 * (1 - ood.get('acceptance', 0.95)):.0f}% of the "
            "model's own validation films are.",
            "",
        ]
    if figures:
        lines += ["## Figures", ""]
        for name in figures:
            lines += [f"![{name}]({name})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------- simulation
SIM_METRICS = ("accuracy", "specificity", "sensitivity", "log_loss")


def resample_to_prevalence(labels: Tensor, prevalence: float, generator: torch.Generator) -> Tensor:
    """Indices of the largest subsample of a site with the given PNEUMONIA share (one class thinned)."""
    labels = labels.long().reshape(-1)
    pos, neg = torch.nonzero(labels == 1).reshape(-1), torch.nonzero(labels == 0).reshape(-1)
    n_pos, n_neg = pos.numel(), neg.numel()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a site needs films of both classes to be resampled")
    if n_pos / (n_pos + n_neg) > prevalence:
        n_pos = max(1, round(prevalence / (1 - prevalence) * n_neg))
        pos = pos[torch.randperm(pos.numel(), generator=generator)[:n_pos]]
    else:
        n_neg = max(1, round((1 - prevalence) / prevalence * n_pos))
        neg = neg[torch.randperm(neg.numel(), generator=generator)[:n_neg]]
    return torch.cat([pos, neg]).sort().values


def _draw(n: int, k: int, draws: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``k`` films of ``n`` per draw, without replacement: their indices (draws, k) and a 0/1 mask (draws, n)."""
    chosen = torch.argsort(torch.rand(draws, n, generator=generator), dim=1)[:, :k]
    mask = torch.zeros(draws, n, dtype=torch.float64)
    mask.scatter_(1, chosen, 1.0)
    return chosen, mask


def _scores(logits: Tensor, calls: Tensor, y: Tensor, rest: Tensor) -> dict[str, Tensor]:
    """Per-draw metrics on the ``rest`` films: (B, n) logits and calls, (B, n) 0/1 rest mask."""
    yd = y.double()[None, :]
    correct = (calls.double() == yd).double()
    neg, pos = rest * (1 - yd), rest * yd
    return {
        "accuracy": (rest * correct).sum(1) / rest.sum(1),
        "specificity": (neg * correct).sum(1) / neg.sum(1).clamp_min(1e-300),
        "sensitivity": (pos * correct).sum(1) / pos.sum(1).clamp_min(1e-300),
        "log_loss": (rest * _bce(logits, yd)).sum(1) / rest.sum(1),
    }


def simulate_site(
    z: Tensor,
    y: Tensor,
    model: ModelReference,
    k: int,
    draws: int,
    generator: torch.Generator,
    *,
    unlabelled: int = 100,
    alpha: float = ALPHA,
) -> dict[str, dict[str, Tensor]]:
    """``draws`` samples of ``k`` labelled films from one site (``k = 0``: ``unlabelled`` unlabelled films,
    at most half the site; prevalence only); each fits a profile and is scored on the rest of the site,
    with and without it.
    Returns {"profile" | "model": {metric: (draws,)}} plus {"changed": {"calibration", "prevalence"}}."""
    z, y = z.double().reshape(-1), y.long().reshape(-1)
    n = z.numel()
    size = k if k > 0 else min(unlabelled, n // 2)
    if size >= n:
        raise ValueError(f"a site of {n} films cannot give {size} films and keep a rest to score")
    chosen, drawn = _draw(n, size, draws, generator)
    ones = torch.ones(draws, size, dtype=torch.float64)
    w_lab, w_unl = (ones, torch.zeros_like(ones)) if k > 0 else (torch.zeros_like(ones), ones)
    batch = fit_batch(z[chosen], y[chosen], w_lab, w_unl, model, alpha=alpha)
    rest = 1.0 - drawn
    base_logits = (z / model.temperature)[None, :].expand(draws, -1)
    base_calls = (model.probs(z) >= model.threshold)[None, :].expand(draws, -1)
    return {
        "model": _scores(base_logits, base_calls, y, rest),
        "profile": _scores(batch.logits(z), batch.decisions(z), y, rest),
        "changed": {"calibration": batch.calibration_changed, "prevalence": batch.prevalence_changed},
    }


def worse(metric: str, profile: Tensor, model: Tensor, tolerance: float = 1e-9) -> Tensor:
    """Where the profile scored worse than the model on the same draw (log loss: higher is worse)."""
    if metric == "log_loss":
        return profile > model + tolerance
    return profile < model - tolerance


def quantile_worst(metric: str, values: Tensor, q: float = 0.10) -> float:
    """The ``q`` quantile from the bad end: the 10th percentile of a rate, the 90th of log loss."""
    values = values.double()
    values = values[values.isfinite()]
    if values.numel() == 0:
        return math.nan
    return float(torch.quantile(values, 1 - q if metric == "log_loss" else q))


def summarise_simulation(
    cells: Mapping[tuple[float, int], Sequence[Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """One row per (prevalence, k) over every site's draws: the median and the worst-decile value of each
    metric with and without the profile; per site, whether the profile was worse than the model in more
    than 10% of its draws (the paired form of "the 10th percentile is never worse"); how often it changed."""
    rows = []
    for (prevalence, k), sites in sorted(cells.items()):
        row: dict[str, Any] = {"prevalence": prevalence, "k": k, "sites": len(sites)}
        for metric in SIM_METRICS:
            for which in ("model", "profile"):
                values = torch.cat([s[which][metric] for s in sites])
                finite = values[values.isfinite()]
                row[f"{metric}_{which}_median"] = float(finite.median()) if finite.numel() else math.nan
                row[f"{metric}_{which}_p10"] = quantile_worst(metric, values)
            row[f"{metric}_sites_worse"] = sum(
                float(worse(metric, s["profile"][metric], s["model"][metric]).double().mean()) > 0.10
                for s in sites
            )
        row["calibration_changed"] = float(
            torch.cat([s["changed"]["calibration"] for s in sites]).double().mean()
        )
        row["prevalence_changed"] = float(
            torch.cat([s["changed"]["prevalence"] for s in sites]).double().mean()
        )
        rows.append(row)
    return rows


def render_simulation_table(rows: Sequence[Mapping[str, Any]], draws: int, unlabelled: int) -> str:
    """The markdown table: each cell ``model -> profile``; p10 is the worst decile (90th percentile of
    log loss); "worse" counts sites where the profile lost to the model in more than 10% of draws."""

    def pair(row: Mapping[str, Any], metric: str, stat: str) -> str:
        return f"{fmt_num(row[f'{metric}_model_{stat}'])} → {fmt_num(row[f'{metric}_profile_{stat}'])}"

    header = ["prevalence", "k", "sites"]
    for name, worst in (("accuracy", "p10"), ("specificity", "p10"), ("log loss", "p90")):
        header += [f"{name} median", f"{name} {worst}"]
    header += ["sensitivity median", "sites worse (acc/spec/LL)", "changed (calib/prev)"]
    body = []
    for row in rows:
        cells = [
            f"{row['prevalence']:.2f}",
            "0 (" + str(unlabelled) + " unlabelled)" if row["k"] == 0 else str(row["k"]),
            str(row["sites"]),
        ]
        for metric in ("accuracy", "specificity", "log_loss"):
            cells += [pair(row, metric, "median"), pair(row, metric, "p10")]
        cells.append(pair(row, "sensitivity", "median"))
        cells.append("/".join(str(row[f"{m}_sites_worse"]) for m in ("accuracy", "specificity", "log_loss")))
        cells.append(f"{100 * row['calibration_changed']:.0f}% / {100 * row['prevalence_changed']:.0f}%")
        body.append(cells)
    lines = [
        f"Each cell: without the profile → with it, over {draws} draws per site and every site pooled. "
        "p10 / p90: the worst decile (10th percentile of a rate, 90th of log loss). Sites worse: sites where the "
        "profile scored below the model in more than 10% of their draws. Changed: share of draws whose "
        "profile changed the calibration / the prevalence.",
        "",
        *md_table(header, body, "rrr"),
    ]
    return "\n".join(lines) + "\n"
