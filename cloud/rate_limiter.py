"""Hold the update-to-data ratio: no training far ahead of fresh data (Reverb's SampleToInsertRatio).

Reverb blocks whichever side runs ahead: samplers when ``samples - spi * inserts``
exceeds the error buffer, writers when it falls below. Robots never wait on the
learner here (the edge never blocks on the cloud), so only the
sampling side is limited: an update of ``n`` samples may start when

    inserts >= min_size_steps   and   samples + n <= samples_per_insert * inserts + error_buffer

where ``inserts`` are the steps the online robots have stored and ``samples`` the
training samples drawn since the limiter started. Offline data does not count as
inserted: it is not fresh.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleet.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RateLimiterConfig:
    """The update-to-data ratio the trainer holds (Reverb SampleToInsertRatio)."""

    samples_per_insert: float = 0.0
    """Training samples per online step stored (0 = no limit)."""
    min_size_steps: int = 0
    """Online steps stored before the first limited update."""
    error_buffer: float = 0.0
    """Samples the trainer may run ahead of samples_per_insert * inserts."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.samples_per_insert) and self.samples_per_insert >= 0):
            raise ConfigError(f"rate_limit.samples_per_insert ({self.samples_per_insert!r}) must be >= 0")
        if self.min_size_steps < 0:
            raise ConfigError(f"rate_limit.min_size_steps ({self.min_size_steps}) must be >= 0")
        if not (math.isfinite(self.error_buffer) and self.error_buffer >= 0):
            raise ConfigError(f"rate_limit.error_buffer ({self.error_buffer!r}) must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.samples_per_insert > 0


class SampleToInsertRatio:
    """Counts inserts and samples; says when a sample may go ahead."""

    def __init__(self, samples_per_insert: float, min_size_steps: int = 0, error_buffer: float = 0.0):
        RateLimiterConfig(samples_per_insert, min_size_steps, error_buffer)  # validates
        self.samples_per_insert = samples_per_insert
        self.min_size_steps = min_size_steps
        self.error_buffer = error_buffer
        self.inserts = 0
        self.samples = 0
        self.waits = 0
        """How many times a sample had to wait."""
        self.waited_s = 0.0
        self._base: int | None = None

    @classmethod
    def from_config(cls, cfg: RateLimiterConfig) -> SampleToInsertRatio | None:
        return cls(cfg.samples_per_insert, cfg.min_size_steps, cfg.error_buffer) if cfg.enabled else None

    def set_inserted(self, total_steps: int) -> None:
        """The buffer's running count of online steps; the first call sets the zero point."""
        if self._base is None:
            self._base = total_steps
        self.inserts = max(self.inserts, total_steps - self._base)

    def can_sample(self, n: int) -> bool:
        if self.inserts < self.min_size_steps:
            return False
        return self.samples + n <= self.samples_per_insert * self.inserts + self.error_buffer

    def sample(self, n: int) -> None:
        self.samples += n

    def wait(self, n: int, poll: Callable[[], int], stop: threading.Event, poll_interval_s: float = 0.1) -> bool:
        """Block until ``n`` samples may be drawn, calling ``poll()`` (returns the running insert count)
        every ``poll_interval_s``; False if ``stop`` was set first."""
        if self.can_sample(n):
            return True
        self.waits += 1
        t0 = time.monotonic()
        try:
            while not stop.is_set():
                self.set_inserted(poll())
                if self.can_sample(n):
                    return True
                stop.wait(poll_interval_s)
            return False
        finally:
            self.waited_s += time.monotonic() - t0
