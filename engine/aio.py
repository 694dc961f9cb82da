"""asyncio helpers the whole engine uses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """`aw`'s result, or TimeoutError after `timeout` seconds (None: no limit).

    Use this, not `asyncio.wait_for`: on Python 3.11, wait_for returns the result and drops
    the cancellation when a cancel arrives after the awaited thing finished but before the
    waiting task resumed (gh-86296, fixed in 3.12). A loop cancelled at that moment goes on
    as if nothing happened, and whoever awaits its end waits for ever: a keep-alive did
    exactly that (tests/runtime/test_close.py). `asyncio.timeout` keeps the cancel."""
    async with asyncio.timeout(timeout):
        return await aw
