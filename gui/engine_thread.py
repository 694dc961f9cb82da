"""The engine's asyncio loop on its own thread; the Qt thread only submits work to it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class EngineThread:
    """One asyncio loop for everything the engine does (agents, discovery, the child)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="corral-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is still running on the loop and let it end (as asyncio.run does),
        finish the loop's executor threads, stop the loop, and close it. A task left
        pending when the loop closed was destroyed mid-way ("Task was destroyed but it is
        pending!"), and whatever it held open (a child's pipes) was left to the garbage
        collector, which called back into the closed loop."""
        if self.loop.is_running():
            for ending in (_cancel_the_rest(timeout / 2), self.loop.shutdown_default_executor()):
                try:
                    self.submit(ending).result(timeout)
                except Exception:  # stopping must not hang on a stuck task or executor job
                    pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_the_rest(timeout: float) -> None:
    """Cancel every other task on this loop and wait (at most `timeout` s) for them to end."""
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=timeout)
