"""Progress of long stages as callbacks, so the library stays silent and callers (the shell, Dagster's
logger) decide where the lines go: `progress(done, total)` for the data stages, and a `ScoringProgress`
(interactions, tokens, rates, ETA) for teacher scoring."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

Progress = Callable[[int, int], None]


def fraction_logger(log: Callable[[str], None], label: str, unit: str = "", scale: float = 1.0, every: float = 0.1) -> Progress:
    """A `progress(done, total)` callback that writes a line to `log` about every `every` of the work and
    at the end: done/total (divided by `scale`, in `unit`), the rate and the ETA."""
    started, reported = time.monotonic(), [-1]
    suffix = f" {unit}" if unit else ""
    digits = 0 if scale == 1 else 1  # counts whole, scaled sizes (MB) to a tenth

    def progress(done: int, total: int) -> None:
        step = int(done / max(total, 1) / every)
        if step > reported[0] or done == total:
            reported[0] = step
            rate = done / max(time.monotonic() - started, 1e-9)
            log(f"{label}: {done / scale:,.{digits}f}/{total / scale:,.{digits}f}{suffix} ({done / max(total, 1):.0%}), "
                f"{rate / scale:,.1f}{suffix}/s, ETA {(total - done) / max(rate, 1e-9):.0f}s")

    return progress


# What each data stage counts its progress in (unit, divisor), so the shell and the Dagster assets say the same.
STAGE_UNITS = {"ingest": ("MB", 1e6), "conversations": ("records", 1.0), "interactions": ("conversations", 1.0),
               "informativeness": ("triples", 1.0)}


def stage_logger(log: Callable[[str], None], stage: str) -> Progress:
    """`fraction_logger` for one of the data stages, in that stage's unit."""
    unit, scale = STAGE_UNITS[stage]
    return fraction_logger(log, stage, unit, scale)


@dataclass
class ScoringProgress:
    """Where a scoring run stands; `tokens` counts sequence tokens (see `BranchJob.sequence_tokens`)."""

    interactions_done: int
    interactions_total: int
    tokens_done: int
    elapsed_s: float
    extra: dict = field(default_factory=dict)

    @property
    def interactions_per_s(self) -> float:
        return self.interactions_done / max(self.elapsed_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_done / max(self.elapsed_s, 1e-9)

    @property
    def eta_s(self) -> float:
        rate = self.interactions_per_s
        return (self.interactions_total - self.interactions_done) / rate if rate > 0 else float("inf")


ProgressCallback = Callable[[ScoringProgress], None]


def progress_logger(log: Callable[[str], None], every: float = 0.1) -> ProgressCallback:
    """A progress callback for long runs that writes a line to `log` every `every` of the work (and at
    the end): interactions and tokens per second and the ETA. Orchestrators pass their logger here."""
    reported = [-1]

    def report(p: ScoringProgress) -> None:
        step = int(p.interactions_done / max(p.interactions_total, 1) / every)
        if step > reported[0] or (p.interactions_done == p.interactions_total and not p.extra):
            reported[0] = step
            log(
                f"hindsight targets: {p.interactions_done}/{p.interactions_total} interactions, "
                f"{p.interactions_per_s:.2f} interactions/s, {p.tokens_per_s:.0f} tokens/s, ETA {p.eta_s:.0f}s"
            )

    return report
