"""Token buckets: per API key id, sized by the key's role (rollout.gateway.rate_limits); and per client address for
refused requests (rollout.gateway.refusal_limits), with the refusals past it counted for aggregated audit records.

The `limits` package (PyPI) offers fixed, moving and sliding windows but no token bucket, and a bucket is the
burst-then-rate behaviour asked for here, in a few lines. Key buckets exist only for keys that authenticated, so their
number is bounded by the key file; address buckets are bounded by refusal_limits.max_addresses. Both live in this
process (each gateway replica counts on its own).
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime

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


def address_key(ip: str) -> str:
    """What one client is counted as: an IPv4 address, or an IPv6 address's /64 (one subscriber's usual allocation,
    which an attacker can rotate through freely)."""
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


class RefusalLimiter:
    """Refused requests per client address. `admit(ip)`: 0 when this refusal may be answered and audited on its own,
    else the seconds until one may (the caller answers 429 and `count`s it); `summaries()` drains the counts as
    aggregated audit events, at most one per address and (reason, status, endpoint)."""

    def __init__(self, per_minute: float, burst: int, max_addresses: int, clock=time.monotonic) -> None:
        self.per_minute, self.burst, self.max_addresses, self.clock = per_minute, burst, max_addresses, clock
        self.buckets: OrderedDict[str, Bucket] = OrderedDict()  # least recently refused first
        self.counts: dict[tuple[str, str, int, str], dict] = {}
        self._lock = threading.Lock()

    def admit(self, ip: str) -> float:
        key, now = address_key(ip), self.clock()
        with self._lock:
            bucket = self.buckets.pop(key, None) or Bucket(self.per_minute, self.burst, now)
            self.buckets[key] = bucket
            if len(self.buckets) > self.max_addresses:  # forget the longest-quiet address (its bucket has refilled)
                self.buckets.popitem(last=False)
            return bucket.take(now)

    def count(self, ip: str, reason: str, status: int, endpoint: str) -> None:
        key, moment = address_key(ip), datetime.now(UTC).isoformat(timespec="milliseconds")
        with self._lock:
            seen = self.counts.setdefault((key, reason, status, endpoint), {"count": 0, "first": moment})
            seen["count"] += 1
            seen["last"] = moment

    def summaries(self) -> list[dict]:
        """The counted refusals ("N refused requests like this from address A between first and last"), one per
        address, reason, status and endpoint, in the arguments of AuditLog.record_refusals; and forget them."""
        with self._lock:
            counts, self.counts = self.counts, {}
        return [{"client_ip": key, "reason": reason, "status": status, **seen, "detail": {"endpoint": endpoint}}
                for (key, reason, status, endpoint), seen in counts.items()]
