"""Client-side request and token rate limits, so a sweep stays under a deployment's quota.

Two token buckets refilled continuously: requests per minute, and tokens per minute where a request
costs its prompt tokens plus ``max_tokens`` (how Azure OpenAI counts a request against its quota).
A bucket holds 10 seconds' worth: Azure enforces per-minute quotas over short windows, so a burst of a
whole minute's quota would still be answered with 429s.
"""

from __future__ import annotations

import asyncio
import threading
import time


class _Bucket:
    def __init__(self, per_minute: float) -> None:
        self.capacity = per_minute / 6  # 10 seconds' worth
        self.level = self.capacity
        self.rate = per_minute / 60.0
        self.stamp = time.monotonic()

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0: take it now)."""
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        amount = min(amount, self.capacity)  # a request larger than a minute's quota still gets through
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate


class RateLimiter:
    """``requests_per_minute`` and/or ``tokens_per_minute``; None means no limit."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None) -> None:
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} is out of range: allowed > 0")
        self.requests = _Bucket(requests_per_minute) if requests_per_minute else None
        self.tokens = _Bucket(tokens_per_minute) if tokens_per_minute else None
        self.lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.requests is not None or self.tokens is not None

    def _reserve(self, tokens: int) -> float:
        """Take quota if both buckets have it; otherwise the seconds to wait before asking again."""
        with self.lock:
            wait = self.requests.wait_for(1) if self.requests else 0.0
            if wait:
                return wait
            token_wait = self.tokens.wait_for(tokens) if self.tokens else 0.0
            if token_wait and self.requests:
                self.requests.level += 1  # give the request slot back; we will ask again
            return token_wait

    def acquire(self, tokens: int = 0) -> None:
        while (wait := self._reserve(tokens)) > 0:
            time.sleep(wait)

    async def aacquire(self, tokens: int = 0) -> None:
        while (wait := self._reserve(tokens)) > 0:
            await asyncio.sleep(wait)
