"""Requests per API key per minute, and failed authentications per client address, in a moving window
(the `limits` library): in memory per API process, or in Redis shared by every process
(`FTJOBS_RATE_LIMIT_STORAGE`)."""

import logging
import math
import time
from collections.abc import Callable

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger("ftjobs.api")


class RateLimited(Exception):
    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"{limit} requests per minute")
        self.limit, self.retry_after = limit, retry_after


class RateLimiter:
    def __init__(self, per_minute: int, storage_uri: str) -> None:
        self.per_minute = per_minute
        self.item = RateLimitItemPerMinute(max(per_minute, 1))
        self.limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))

    def hit(self, key_id: str) -> None:
        """Count a request of `key_id`; RateLimited if it is over the limit."""
        self._limit(key_id, self.limiter.hit)

    def check(self, key_id: str) -> None:
        """RateLimited if `key_id` has used up its limit already; counts nothing."""
        self._limit(key_id, self.limiter.test)

    def _limit(self, key_id: str, allows: Callable[[RateLimitItem, str], bool]) -> None:
        if self.per_minute == 0:
            return
        try:
            allowed = allows(self.item, key_id)
            reset = None if allowed else self.limiter.get_window_stats(self.item, key_id).reset_time
        except Exception:  # the counts' store is down: serving on matters more than counting
            log.warning("rate limit storage unavailable; request not counted", exc_info=True)
            return
        if reset is not None:
            raise RateLimited(self.per_minute, max(1, math.ceil(reset - time.time())))
