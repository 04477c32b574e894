"""The learning-rate range test that resolves `learning_rate_multiplier: "auto"` (docs/api.md).

A few dozen optimizer steps on the job's own batches, the rate growing exponentially from 1/100 to 100 times
the method's base rate; the training loss is smoothed and the pick is a tenth of the rate where it is
lowest (fastai's "minimum / 10" suggestion). The test stops early once the smoothed loss exceeds four times
its lowest (diverged).

Why not the steepest descent (torch-lr-finder's suggestion): on a model that first learns its data's format,
the loss falls fastest in the test's first steps whatever the rate, and the steepest point measured on
SmolLM2 full fine-tuning was 1/17 of the default rate (docs/methods.md); the minimum is where the rate
itself starts to hurt, and a tenth of it keeps a margin below that.

Pure arithmetic: the recipe runs the steps (worker/training/recipe.py) and feeds the losses in.
"""

import math
from dataclasses import dataclass, field

LOWEST, HIGHEST = 1e-2, 1e2
"""The swept multipliers of the method's base rate: four decades, inside the API's (0, 100]."""
COST_SHARE = 0.05
"""The test processes at most this share of the examples the job's training processes (its epochs times
its training examples); each test step is one of the job's steps, so it is also at most this share of them."""
MIN_STEPS, MAX_STEPS = 16, 48
"""Fewer points can't place a slope through the smoothing; more buy little precision (the rate grows by
a factor of 1.2 a step at 48, 1.85 at 16)."""
SMOOTHING = 0.7
"""Exponential moving average of the loss (bias-corrected): short runs need a short memory, or the
smoothed curve lags the rate and the pick drifts high."""
DIVERGED = 4.0
"""The loss has blown up once the smoothed loss is this many times its lowest so far."""
BACKOFF = 10.0
"""The pick is the rate at the lowest smoothed loss divided by this."""
MIN_POINTS = 6
"""Fewer points before divergence say nothing about where the loss is lowest."""
MIN_FALL = 0.01
"""A curve whose smoothed loss never gets this share below its first value has no descent to pick from:
its slopes are noise."""


def budget(planned_examples: int, examples_per_step: int) -> int:
    """The test steps a job can afford: whole steps of `examples_per_step` within COST_SHARE of the
    `planned_examples` its training processes, at most MAX_STEPS."""
    return min(MAX_STEPS, math.floor(COST_SHARE * planned_examples / examples_per_step))


def affordable_steps(planned_examples: int, examples_per_step: int) -> int:
    """The most steps a job's test runs: its budget, or 0 (no test) when that is under MIN_STEPS."""
    steps = budget(planned_examples, examples_per_step)
    return steps if steps >= MIN_STEPS else 0


def rates(base: float, steps: int) -> list[float]:
    """The learning rate of each test step: from LOWEST to HIGHEST times `base`, geometrically."""
    growth = (HIGHEST / LOWEST) ** (1 / (steps - 1))
    return [base * LOWEST * growth**step for step in range(steps)]


@dataclass
class Curve:
    """The smoothed loss against the rate, as the test steps report it."""

    rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    diverged_at: float | None = None
    _average: float = field(default=0.0, init=False, repr=False)

    def add(self, rate: float, loss: float) -> bool:
        """Record one step's loss at `rate`; False once the loss diverged (the test should stop)."""
        if not math.isfinite(loss):
            self.diverged_at = rate
            return False
        self._average = SMOOTHING * self._average + (1 - SMOOTHING) * loss
        smoothed = self._average / (1 - SMOOTHING ** (len(self.losses) + 1))
        if self.losses and smoothed > DIVERGED * min(self.losses):
            self.diverged_at = rate
            return False
        self.rates.append(rate)
        self.losses.append(smoothed)
        return True

    def pick(self) -> tuple[float, str] | tuple[None, str]:
        """A tenth of the rate at the lowest smoothed loss, and how it was found; or None and why there
        is none."""
        points = len(self.losses)
        if points < MIN_POINTS:
            return None, f"the loss diverged after {points} of the test's steps, too early to find its lowest"
        lowest = min(range(points), key=self.losses.__getitem__)
        if self.losses[lowest] > (1 - MIN_FALL) * self.losses[0]:
            return None, "the smoothed loss did not fall anywhere in the tested range"
        return self.rates[lowest] / BACKOFF, (
            f"a tenth of the rate at the lowest smoothed loss ({self.losses[lowest]:.3g} at step "
            f"{lowest + 1} of {points}, rate {self.rates[lowest]:.3g})"
        )
