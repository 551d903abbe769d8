"""Many independent L2 logistic regressions on one feature matrix, each its own L-BFGS.

Every output j (one (lag, strength) pair, or its shuffled control) minimises sklearn's
objective divided by C_j * n_j::

    f_j(w, b) = sum_i m_ij * logloss(x_i . w + b, y_ij) / n_j + ||w||^2 / (2 C_j n_j)

with n_j = sum_i m_ij (the rows output j uses) and the intercept unpenalised, so C means
what sklearn's ``C`` means. The outputs share each matrix product (the costly part) but
nothing else: every output keeps its own curvature history, its own step length and its
own stopping test, and leaves the batch once its largest gradient entry is at most
``tolerance`` (sklearn's lbfgs criterion on the same objective). An output's path
therefore does not depend on which other outputs are fitted beside it, so a lag's probe
is the same whichever lags share the grid (to float rounding in the shared products).

torch's ``LBFGS`` optimises the *sum* of the outputs with one history, one line search
and one stopping test, so each output's result depended on the others and an output could
stop far from its optimum unnoticed; no maintained library batches independent L-BFGS
problems, hence this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Armijo sufficient decrease; the approximate-Wolfe fallback (Hager & Zhang, 2005) accepts
# a step whose loss rose by at most float noise when the slope shows it did not overshoot,
# which float32 losses need near the optimum, where true decreases fall below rounding.
_ARMIJO = 1e-4
_NOISE = 1e-6
_MAX_HALVINGS = 30
_HISTORY = 10


@dataclass(frozen=True)
class JointFit:
    """coef: (width, outputs); bias: (outputs,); per output: whether it converged, the
    iterations it used and its final largest absolute gradient entry."""

    coef: torch.Tensor
    bias: torch.Tensor
    converged: np.ndarray
    iterations: np.ndarray
    grad_max: np.ndarray


class _Objective:
    """Losses and gradients of a subset of outputs at parameters ``theta`` (width + 1, a)."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                 strengths: torch.Tensor) -> None:
        self.x = features
        self.y = targets
        self.m = weights
        self.counts = weights.sum(0).clamp(min=1.0)
        self.penalty = 1.0 / (strengths.to(features.dtype) * self.counts)  # 1 / (C n)

    def __call__(self, theta: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coef, bias = theta[:-1], theta[-1]
        logits = self.x @ coef + bias  # (rows, a)
        y, m, n, lam = self.y[:, cols], self.m[:, cols], self.counts[cols], self.penalty[cols]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        # float64 sums: the loss must resolve differences far below float32's 1e-7.
        value = (m * loss).sum(0, dtype=torch.float64) / n.double() \
            + 0.5 * lam.double() * (coef.double() ** 2).sum(0)
        residual = m * (torch.sigmoid(logits) - y) / n
        grad = torch.cat([self.x.T @ residual + coef * lam, residual.sum(0, keepdim=True)])
        return value, grad


def _direction(grad: torch.Tensor, steps: list[torch.Tensor], changes: list[torch.Tensor],
               rhos: list[torch.Tensor], gamma: torch.Tensor) -> torch.Tensor:
    """-H grad by the two-loop recursion, column by column (rho 0 marks an unused pair)."""
    q = grad.clone()
    alphas = []
    for s, y, rho in zip(reversed(steps), reversed(changes), reversed(rhos)):
        alpha = rho * (s * q).sum(0)
        q -= alpha * y
        alphas.append(alpha)
    r = gamma * q
    for s, y, rho, alpha in zip(steps, changes, rhos, reversed(alphas)):
        beta = rho * (y * r).sum(0)
        r += s * (alpha - beta)
    return -r


def fit_joint(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
              strengths: torch.Tensor, max_iter: int = 100, tolerance: float = 1e-4) -> JointFit:
    """Fit every output of ``targets`` (rows, outputs) on the standardized ``features``.

    weights: (rows, outputs) 0/1, the rows each output uses; strengths: (outputs,) C each.
    """
    width, n_out = features.shape[1], targets.shape[1]
    objective = _Objective(features, targets, weights, strengths)
    theta = torch.zeros(width + 1, n_out, dtype=features.dtype)
    converged = np.zeros(n_out, dtype=bool)
    iterations = np.zeros(n_out, dtype=np.int64)
    grad_max = np.full(n_out, np.inf)
    active = torch.arange(n_out)
    value, grad = objective(theta, active)
    steps: list[torch.Tensor] = []
    changes: list[torch.Tensor] = []
    rhos: list[torch.Tensor] = []
    gamma = torch.ones(n_out, dtype=features.dtype)
    for iteration in range(max_iter + 1):
        largest = grad.abs().amax(0)
        grad_max[active.numpy()] = largest.numpy()
        done = largest <= tolerance
        converged[active[done].numpy()] = True
        if iteration == max_iter:
            break
        keep = ~done
        if not keep.any():
            break
        if done.any():
            active, value, grad, gamma = active[keep], value[keep], grad[:, keep], gamma[keep]
            steps, changes, rhos = ([t[:, keep] for t in steps], [t[:, keep] for t in changes],
                                    [t[keep] for t in rhos])
        current = theta[:, active]
        direction = _direction(grad, steps, changes, rhos, gamma)
        slope = (grad * direction).sum(0)
        uphill = slope >= 0  # a stale history; restart those outputs on steepest descent
        if uphill.any():
            direction[:, uphill] = -grad[:, uphill]
            slope = (grad * direction).sum(0)
            rhos = [torch.where(uphill, 0.0, rho) for rho in rhos]
        length = torch.ones_like(slope)
        if not steps:  # no curvature yet: a first step of unit length
            length = torch.clamp(1.0 / grad.abs().sum(0), max=1.0)
        moved, new_value, new_grad, stalled = _line_search(
            objective, active, current, value, grad, direction, slope, length)
        iterations[active.numpy()] += 1
        theta[:, active] = moved
        s, y = moved - current, new_grad - grad
        sy = (s * y).sum(0)
        curved = sy > 1e-10
        steps.append(s)
        changes.append(y)
        rhos.append(torch.where(curved, 1.0 / sy.clamp(min=1e-10), 0.0))
        gamma = torch.where(curved, sy / (y * y).sum(0).clamp(min=1e-30), gamma)
        if len(steps) > _HISTORY:
            steps, changes, rhos = steps[1:], changes[1:], rhos[1:]
        value, grad = new_value, new_grad
        if stalled.any():  # no acceptable step: leave the batch as not converged
            largest = grad[:, stalled].abs().amax(0)
            grad_max[active[stalled].numpy()] = largest.numpy()
            converged[active[stalled].numpy()] = (largest <= tolerance).numpy()
            keep = ~stalled
            active, value, grad, gamma = active[keep], value[keep], grad[:, keep], gamma[keep]
            steps, changes, rhos = ([t[:, keep] for t in steps], [t[:, keep] for t in changes],
                                    [t[keep] for t in rhos])
            if not active.numel():
                break
    return JointFit(theta[:-1].clone(), theta[-1].clone(), converged, iterations, grad_max)


def _line_search(objective: _Objective, active: torch.Tensor, current: torch.Tensor,
                 value: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor,
                 slope: torch.Tensor, length: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backtracking per output; returns new parameters, values, gradients and a mask of the
    outputs for which no step was acceptable (those keep their parameters)."""
    moved, new_value, new_grad = current.clone(), value.clone(), grad.clone()
    pending = torch.arange(active.numel())
    length = length.clone()
    for _ in range(_MAX_HALVINGS):
        trial = current[:, pending] + length[pending] * direction[:, pending]
        trial_value, trial_grad = objective(trial, active[pending])
        rise = trial_value - value[pending]
        armijo = rise <= _ARMIJO * length[pending].double() * slope[pending].double()
        new_slope = (trial_grad * direction[:, pending]).sum(0)
        approximate = (rise <= _NOISE * value[pending].abs()) & \
            (new_slope <= (1 - 2 * _ARMIJO) * -slope[pending])
        ok = armijo | approximate
        accepted = pending[ok]
        moved[:, accepted] = trial[:, ok]
        new_value[accepted] = trial_value[ok]
        new_grad[:, accepted] = trial_grad[:, ok]
        pending = pending[~ok]
        if not pending.numel():
            break
        length[pending] *= 0.5
    stalled = torch.zeros(active.numel(), dtype=torch.bool)
    stalled[pending] = True
    return moved, new_value, new_grad, stalled
