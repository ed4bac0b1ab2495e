"""Sparsity schedules in optimiser steps (not epochs), the average parameter count over training,
and the fit of the average-parameter-count scaling law (The Journey Matters, ICLR'25, arXiv
2501.12486; official code tjingrant/sparse-llm-code, a MaxText fork).

Convention: a schedule's value at ``step`` (0-based) is the sparsity of the weights that optimiser
step ``step`` trains, i.e. after every pruning event at a step ``<= step``. This is the Journey
code's order: its pruning event at step ``t`` runs before the training step ``t``.

- :func:`cubic_sparsity`: Zhu & Gupta 2017 ("To prune, or not to prune"), the AGP schedule of nni,
  sparseml and ``torch.ao``.
- :func:`geometric_sparsity`: the Journey code's gradual global magnitude schedule (constant
  per-event pruning rate, so the density falls geometrically).
- :func:`one_shot_sparsity`: all at once at one step.
- :func:`average_param_count`, :func:`journey_average_fraction`: the paper's N̄.
- :func:`fit_scaling_law`: Chinchilla's fitting procedure (Hoffmann et al. 2022, Approach 3) with N
  replaced by N̄.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


def _int(name: str, v, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    return int(v)


def _fraction(name: str, v, *, closed: bool = False) -> float:
    ok = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)
    if not ok or not (0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1{']' if closed else ')'}; got {v!r}")
    return float(v)


def cubic_sparsity(step: int, *, start: int, end: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017, "To prune, or not to prune", arXiv 1710.01878) cubic schedule:
    ``s_t = s_f + (s_i - s_f) (1 - (t - t0)/(t1 - t0))**3`` for ``start = t0 <= t <= t1 = end``,
    ``initial`` before ``start`` and ``final`` after ``end``. In the paper the value is applied every
    ``Δt`` steps; :class:`~prunekit.training.gradual.SparsityScheduler` samples it at its pruning
    events (``frequency``)."""
    step = _int("step", step)
    start, end = _int("start", start), _int("end", end)
    if end <= start:
        raise ValueError(f"end must be > start for the cubic schedule; got start={start}, end={end}")
    final = _fraction("final", final)
    initial = _fraction("initial", initial)
    if initial > final:
        raise ValueError(f"initial must be in [0, final={final}]; got {initial!r}")
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def _geometric_args(start, end, final, frequency) -> tuple[int, int, float, int, int]:
    start, end = _int("start", start), _int("end", end)
    frequency = _int("frequency", frequency, 1)
    final = _fraction("final", final)
    if end < start:
        raise ValueError(f"end must be >= start; got start={start}, end={end}")
    if (end - start) % frequency:
        raise ValueError(
            f"end - start must be a multiple of frequency (the Journey code asserts it); got "
            f"start={start}, end={end}, frequency={frequency} (end - start = {end - start})"
        )
    return start, end, final, frequency, (end - start) // frequency + 1


def geometric_sparsity(step: int, *, start: int, end: int, final: float, frequency: int) -> float:
    """The Journey code's gradual schedule [code: MaxText/train.py, ``global_gradual``]: pruning
    events at ``start, start + frequency, ..., end`` (``end - start`` must be a multiple of
    ``frequency``), ``K = (end - start)/frequency + 1`` events, a per-event rate
    ``s1 = 1 - (1 - S)**(1/K)``, and after event ``i`` (0-based) the density
    ``(1 - s1)**(i + 1) = (1 - S)**((i + 1)/K)``, so the sparsity is exactly ``final`` from ``end`` on.

    Departure from the official code: it fires on ``step % frequency == 0`` inside
    ``[start, end]``, which equals the events above when ``start`` is a multiple of ``frequency``;
    otherwise it skips the event at ``start`` and ends short of ``final``. Events here are counted
    from ``start`` as the spec describes. The density at the last event is ``1 - final`` exactly
    (not ``(1 - s1)**K``, which floating point may put a hair off)."""
    step = _int("step", step)
    start, end, final, frequency, k = _geometric_args(start, end, final, frequency)
    if step < start:
        return 0.0
    i = min((step - start) // frequency, k - 1)
    if i == k - 1:
        return final
    return 1.0 - (1.0 - final) ** ((i + 1) / k)


def geometric_events(*, start: int, end: int, frequency: int) -> list[int]:
    """The steps at which :func:`geometric_sparsity` prunes."""
    start, end, _, frequency, _ = _geometric_args(start, end, 0.0, frequency)
    return list(range(start, end + 1, frequency))


def one_shot_sparsity(step: int, *, at: int, final: float) -> float:
    """All the pruning at step ``at``: ``final`` from ``at`` on, 0 before (e.g. pruning at
    initialisation with ``at=0``, or the Journey paper's one-shot baseline)."""
    step, at = _int("step", step), _int("at", at)
    final = _fraction("final", final)
    return final if step >= at else 0.0


def average_param_count(
    density: Callable[[int], float] | Sequence[float],
    total_steps: int | None = None,
    n_params: float = 1.0,
) -> float:
    """The average parameter count over training, ``N̄ = (1/T) Σ_t n_params · density(t)`` for
    ``t = 0 .. T-1`` (The Journey Matters: N̄ = (1/D)∫ N_nonzero dτ, in steps of equal token
    count). ``density``: a function of the step (e.g. ``lambda t: 1 - geometric_sparsity(t, ...)``)
    with ``total_steps``, or the per-step densities (``total_steps``, if given, must be their
    number). ``n_params=1`` gives the fraction N̄/N."""
    if callable(density):
        total_steps = _int("total_steps", total_steps, 1)
        values = np.array([float(density(t)) for t in range(total_steps)])
    else:
        values = np.asarray(list(density), dtype=float)
        if values.ndim != 1 or values.size == 0:
            raise ValueError("density must be a function of the step or a non-empty list of densities")
        if total_steps is not None and _int("total_steps", total_steps, 1) != values.size:
            raise ValueError(f"total_steps={total_steps} but {values.size} densities were given")
    if np.any(~np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
        bad = values[(~np.isfinite(values)) | (values < 0) | (values > 1)][0]
        raise ValueError(f"densities must be in [0, 1]; got {float(bad)!r}")
    if not (isinstance(n_params, (int, float)) and n_params > 0):
        raise ValueError(f"n_params must be a number > 0; got {n_params!r}")
    return float(n_params * values.mean())


def journey_average_fraction(sparsity: float, start: float, end: float, schedule: str = "geometric") -> float:
    """N̄/N of a gradual schedule in the continuous limit, with ``f0, f1`` = ``start``, ``end`` as
    fractions of training and ``S`` = ``sparsity``:

    - ``"geometric"`` [ours, spec §10]: ``f0 + (f1 - f0)·S/(-ln(1 - S)) + (1 - f1)(1 - S)``
      (0.736 for S = 0.5 from 25 % to 75 %);
    - ``"cubic"`` (Zhu-Gupta from 0) [ours]: ``f0 + (f1 - f0)(1 - 3S/4) + (1 - f1)(1 - S)``.

    The discrete schedules' averages approach these as the number of events grows."""
    s = _fraction("sparsity", sparsity)
    f0, f1 = _fraction("start", start, closed=True), _fraction("end", end, closed=True)
    if f1 < f0:
        raise ValueError(f"end must be >= start; got start={start}, end={end}")
    if schedule == "geometric":
        mid = 1.0 if s == 0 else s / -math.log1p(-s)
    elif schedule == "cubic":
        mid = 1.0 - 0.75 * s
    else:
        raise ValueError(f"schedule must be 'geometric' or 'cubic'; got {schedule!r}")
    return f0 + (f1 - f0) * mid + (1.0 - f1) * (1.0 - s)


# --- the scaling law ---------------------------------------------------------------------------

#: Chinchilla's grid of initial points (Hoffmann et al. 2022, Appendix D.2)
GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}


@dataclass
class ScalingLaw:
    """A fitted ``L(N̄, D) = E + A/N̄**alpha + B/D**beta`` (``B = beta = 0`` for the ``form="N"``
    fit). ``residuals``: ``log L - log L̂`` of each fitted point, in order."""

    E: float
    A: float
    alpha: float
    B: float = 0.0
    beta: float = 0.0
    form: str = "ND"
    objective: float = 0.0
    residuals: list[float] = field(default_factory=list)

    def predict(self, n_bar, tokens=None) -> np.ndarray:
        """L̂ at ``n_bar`` (and ``tokens`` for the ``"ND"`` form)."""
        n = np.asarray(n_bar, dtype=float)
        out = self.E + self.A / n**self.alpha
        if self.form == "ND":
            if tokens is None:
                raise ValueError("this law has a data term: pass tokens=")
            out = out + self.B / np.asarray(tokens, dtype=float) ** self.beta
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    val = np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))
    grad = np.where(a <= delta, r, delta * np.sign(r))
    return val, grad


def fit_scaling_law(
    n_bar: Sequence[float],
    tokens: Sequence[float] | None,
    loss: Sequence[float],
    *,
    form: str = "ND",
    delta: float = 1e-3,
    starts: int | None = None,
    grid: dict | None = None,
) -> ScalingLaw:
    """Fit ``L(N̄, D) = E + A/N̄**α + B/D**β`` by Chinchilla's procedure (Hoffmann et al. 2022,
    Approach 3, as The Journey Matters uses it with N̄ for N): minimise the Huber loss
    (``delta`` = 1e-3) of ``log L̂ - log L`` with ``log L̂ = logsumexp(a - α log N̄, b - β log D, e)``
    (``A, B, E = exp(a), exp(b), exp(e)``), by L-BFGS (scipy) from every point of a grid of initial
    values (:data:`GRID`, Chinchilla's), keeping the best.

    ``form="N"`` fits ``L(N̄) = E + A/N̄**α`` only (one token budget: the data term is then a
    constant absorbed by E); ``tokens`` may be ``None`` there. With ``form="ND"`` the token counts
    must vary, or the fit is not identifiable (a ValueError says so).
    ``starts``: run L-BFGS from only the ``starts`` grid points of lowest objective [ours, for speed;
    ``None``: every grid point, as Chinchilla]."""
    from scipy.optimize import minimize

    if form not in ("ND", "N"):
        raise ValueError(f"form must be 'ND' (L(N̄, D)) or 'N' (L(N̄), one token budget); got {form!r}")
    n = np.asarray(n_bar, dtype=float)
    y = np.asarray(loss, dtype=float)
    if n.ndim != 1 or n.shape != y.shape or n.size < 3:
        raise ValueError(f"n_bar and loss need >= 3 points, as equal-length lists; got {n.shape}, {y.shape}")
    if np.any(~(n > 0)) or np.any(~(y > 0)) or not np.all(np.isfinite(n)) or not np.all(np.isfinite(y)):
        raise ValueError("n_bar and loss must be finite numbers > 0")
    if not delta > 0:
        raise ValueError(f"delta must be > 0; got {delta!r}")
    log_n, log_y = np.log(n), np.log(y)
    if form == "ND":
        if tokens is None:
            raise ValueError("form='ND' needs tokens= (the token count of each run); use form='N' without")
        d = np.asarray(tokens, dtype=float)
        if d.shape != n.shape or np.any(~(d > 0)):
            raise ValueError(f"tokens must be {n.size} numbers > 0; got shape {d.shape}")
        if np.allclose(d, d[0]):
            raise ValueError(
                "every run has the same token count: B and beta cannot be fitted; use form='N' "
                "(L(N̄) = E + A/N̄^alpha)"
            )
        log_d = np.log(d)
    else:
        log_d = np.zeros_like(log_n)
    if starts is not None:
        starts = _int("starts", starts, 1)
    g = dict(GRID, **(grid or {}))
    names = ["a", "alpha", "e"] + (["b", "beta"] if form == "ND" else [])

    def terms(x):  # x: (..., len(names)) -> the log-sum-exp's arguments (..., n_points, k)
        cols = [x[..., 0:1] - x[..., 1:2] * log_n, np.broadcast_to(x[..., 2:3], x.shape[:-1] + log_n.shape)]
        if form == "ND":
            cols.append(x[..., 3:4] - x[..., 4:5] * log_d)
        return np.stack(cols, axis=-1)

    def objective(x):
        t = terms(x)
        m = t.max(-1, keepdims=True)
        w = np.exp(t - m)
        lse = m[..., 0] + np.log(w.sum(-1))
        val, dr = _huber(lse - log_y, delta)
        p = w / w.sum(-1, keepdims=True)  # d lse / d term
        grads = [dr * p[:, 0], -dr * p[:, 0] * log_n, dr * p[:, 1]]
        if form == "ND":
            grads += [dr * p[:, 2], -dr * p[:, 2] * log_d]
        return float(val.sum()), np.array([gr.sum() for gr in grads])

    points = np.array(list(itertools.product(*(g[k] for k in names))), dtype=float)
    if starts is not None and starts < len(points):  # rank the grid by its objective, vectorised
        t = terms(points)
        m = t.max(-1, keepdims=True)
        lse = m[..., 0] + np.log(np.exp(t - m).sum(-1))
        vals = _huber(lse - log_y, delta)[0].sum(-1)
        points = points[np.argsort(vals, kind="stable")[:starts]]
    best = None
    for x0 in points:
        res = minimize(objective, x0, jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    x = dict(zip(names, best.x, strict=True))
    t = terms(best.x)
    m = t.max(-1, keepdims=True)
    pred = m[..., 0] + np.log(np.exp(t - m).sum(-1))
    return ScalingLaw(
        E=float(np.exp(x["e"])), A=float(np.exp(x["a"])), alpha=float(x["alpha"]),
        B=float(np.exp(x["b"])) if form == "ND" else 0.0, beta=float(x.get("beta", 0.0)), form=form,
        objective=float(best.fun), residuals=[float(r) for r in log_y - pred],
    )  # fmt: skip
