"""Per-key request rates: a token bucket per API key id, sized by the key's role (rollout.gateway.rate_limits).

The `limits` package (PyPI) offers fixed, moving and sliding windows but no token bucket, and a bucket is the
burst-then-rate behaviour asked for here, in a few lines. Buckets exist only for keys that authenticated, so their
number is bounded by the key file; they live in this process (each gateway replica counts on its own).
"""

from __future__ import annotations

import math
import threading
import time

from workflow.config import RateLimits


class Bucket:
    def __init__(self, per_minute: float, burst: int, now: float) -> None:
        self.rate, self.capacity = per_minute / 60.0, float(burst)
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float) -> float:
        """0 when a request may go now (a token is spent), else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """`wait(key_id, role)`: 0 when the key may send a request now, else the seconds it must wait (Retry-After)."""

    def __init__(self, per_role: RateLimits, clock=time.monotonic) -> None:
        """per_role: rollout.gateway.rate_limits, a RateLimit per role."""
        self.per_role, self.clock = per_role, clock
        self.buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()

    def wait(self, key_id: str, role: str) -> float:
        now = self.clock()
        with self._lock:
            bucket = self.buckets.get((key_id, role))
            if bucket is None:
                rate = getattr(self.per_role, role)
                bucket = self.buckets[(key_id, role)] = Bucket(rate.requests_per_minute, rate.burst, now)
            return bucket.take(now)


def retry_after(seconds: float) -> str:
    """The Retry-After header's value: whole seconds, rounded up (a client waiting that long gets a token)."""
    return str(max(1, math.ceil(seconds)))
