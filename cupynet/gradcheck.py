"""Finite-difference gradient checks in float64 along random directions.

Instead of perturbing one element at a time (thousands of loss evaluations for a ResNet), each check
draws a random unit direction d over *all* inputs at once and compares the central difference
    (L(v + h d) - L(v - h d)) / 2h
with the analytic directional derivative <grad L, d>. A wrong gradient in any element shows up in
almost every random direction, so a few directions check a whole model.

Tolerance, derived rather than tuned: in float64 the central difference has truncation error
O(h^2 |L'''|) ~ 1e-10 for h = 1e-5 and rounding error ~ eps64 * |L| / h ~ 2e-11 |L|, so a correct
gradient agrees to ~1e-9 relative; we allow 1e-6 relative (+1e-9 absolute). Inputs are drawn away from
ReLU kinks by the callers (a perturbation that crosses a kink breaks the smoothness assumption).

    result = check_directional_gradients(loss_fn, grad_fn, [x, w], np.random.default_rng(0))
    assert result.ok, result.report()
"""
from dataclasses import dataclass, field

import numpy as np

RTOL = 1e-6
ATOL = 1e-9


@dataclass
class GradcheckResult:
    numeric: list = field(default_factory=list)    # one central difference per direction
    analytic: list = field(default_factory=list)   # one <grad, d> per direction

    @property
    def errors(self):
        return [abs(n - a) / (max(abs(n), abs(a)) + ATOL / RTOL) for n, a in zip(self.numeric, self.analytic)]

    @property
    def ok(self):
        return all(abs(n - a) <= ATOL + RTOL * max(abs(n), abs(a)) for n, a in zip(self.numeric, self.analytic))

    def report(self):
        rows = [f"numeric {n:+.12e}  analytic {a:+.12e}  rel.err {e:.2e}"
                for n, a, e in zip(self.numeric, self.analytic, self.errors)]
        return "\n".join(rows)


def check_directional_gradients(loss_fn, grad_fn, arrays, rng, num_directions=3, h=1e-5):
    """Compare finite differences of `loss_fn` with `grad_fn` along random directions.

    loss_fn(): the scalar loss (float) at the current contents of `arrays`;
    grad_fn(): the analytic gradients (list, one per array) at the current contents;
    arrays: float64 NumPy arrays that loss_fn reads; they are perturbed in place and restored.
    """
    for a in arrays:
        if a.dtype != np.float64:
            raise TypeError("gradient checks need float64 arrays")
    grads = [np.array(g, dtype=np.float64, copy=True) for g in grad_fn()]
    result = GradcheckResult()
    for _ in range(num_directions):
        directions = [rng.standard_normal(a.shape) for a in arrays]
        norm = np.sqrt(sum(float(np.vdot(d, d)) for d in directions))
        directions = [d / norm for d in directions]
        originals = [a.copy() for a in arrays]
        _shift(arrays, directions, +h)
        loss_plus = float(loss_fn())
        _restore(arrays, originals)
        _shift(arrays, directions, -h)
        loss_minus = float(loss_fn())
        _restore(arrays, originals)
        result.numeric.append((loss_plus - loss_minus) / (2 * h))
        result.analytic.append(sum(float(np.vdot(g, d)) for g, d in zip(grads, directions)))
    return result


def _shift(arrays, directions, step):
    for a, d in zip(arrays, directions):
        a += step * d


def _restore(arrays, originals):
    for a, o in zip(arrays, originals):
        a[...] = o
