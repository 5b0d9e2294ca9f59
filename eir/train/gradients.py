"""Per-epoch gradient statistics, kept on the trainer's device so they cost no host sync per iteration.

A diverging run shows up first in its gradients, not in its epoch-mean loss: one step with a norm
ten times the epoch's usual is what turns a finite loss into an infinite one a few iterations later
(DKD on CamVid 5-3, BENCHMARKS.md). Under AMP the GradScaler skips every step whose gradient
overflowed in fp16; `skipped_steps` counts those (and, without AMP, the steps whose gradient was
not finite, which the optimizer then applies). Each epoch's numbers travel with its metrics to the
console line and MLflow; the last few norms go into the error a non-finite loss raises.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch


class GradientWatch:
    """The global gradient norm of every optimizer step of one epoch: largest and mean finite norm, and how
    many steps had a non-finite one. Call `observe` after the gradients are final (after
    `GradScaler.unscale_` under AMP) and before the optimizer step."""

    # Steps kept for the message of a diverged run: DKD's runaway on CamVid (BENCHMARKS.md) already had norms
    # of 10^4 five steps before its infinite loss, so five did not show where it began.
    RECENT_STEPS = 20

    def __init__(self, device: torch.device, recent: int = RECENT_STEPS):
        self.device = device
        self.recent: deque[torch.Tensor] = deque(maxlen=recent)
        self.start_epoch()

    def start_epoch(self) -> None:
        # [largest finite norm, sum of finite norms, finite steps, non-finite steps]
        self._totals = torch.zeros(4, dtype=torch.float64, device=self.device)

    def observe(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads).to(torch.float64)
        finite = torch.isfinite(norm)
        value = torch.where(finite, norm, torch.zeros_like(norm))
        self._totals[0] = torch.maximum(self._totals[0], value)
        self._totals[1:] += torch.stack([value, finite.double(), (~finite).double()])
        self.recent.append(norm)

    def epoch_metrics(self) -> dict[str, float]:
        """The epoch's `grad_norm_max`, `grad_norm_mean` (finite steps only) and `skipped_steps`: one host read."""
        largest, total, finite, nonfinite = self._totals.tolist()
        return {
            "grad_norm_max": largest,
            "grad_norm_mean": total / finite if finite else 0.0,
            "skipped_steps": int(nonfinite),
        }

    def recent_norms(self) -> list[float]:
        """The global norms of the last few steps, oldest first (for the message of a diverged run)."""
        return [float(norm) for norm in self.recent]
