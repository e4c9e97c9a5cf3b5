"""Retry temporary failures with jittered exponential backoff, inside one deadline."""

from __future__ import annotations

import logging
import random

import trio

from thunderfs_common.glance_client import GlanceUnavailable, is_temp_failure

log = logging.getLogger(__name__)


async def with_retries(fn, *args, timeout: float, what: str, base: float = 0.05, cap: float = 2.0,
                       give_up=lambda: None, sleep=trio.sleep):
    """``await fn(*args)`` until it succeeds, fails for good, or ``timeout`` seconds pass.

    A hanging attempt is cut at the deadline; the last temporary error is raised then.  After a
    failed attempt and after the pause before the next, ``give_up()`` may return an exception to
    raise at once (the source is known down); ``sleep`` pauses (and may end early to let it say so).
    """
    deadline = trio.current_time() + timeout
    attempt, last_exc = 0, None
    with trio.move_on_at(deadline):
        while True:
            try:
                return await fn(*args)
            except Exception as exc:
                if not is_temp_failure(exc):
                    raise
                last_exc = exc
            if (stop := give_up()) is not None:
                raise stop from last_exc
            attempt += 1
            delay = min(cap, base * 2**attempt) * random.uniform(0.5, 1.5)
            log.debug("%s: attempt %d failed (%s); again in %.2fs", what, attempt, last_exc, delay)
            await sleep(delay)
            if (stop := give_up()) is not None:
                raise stop from last_exc
    if last_exc is not None:
        raise GlanceUnavailable(f"{what}: gave up after {timeout:g}s and {attempt} attempts: {last_exc}")
    raise GlanceUnavailable(f"{what}: no answer within {timeout:g}s")
