"""How long a reply may go without progress before it counts as stalled.

llama.cpp waiting on an RPC worker that stopped answering (SIGSTOP, a debugger, a driver
stuck in the kernel, a link that drops packets but not the connection) waits forever and
looks at no cancel. The agents' heartbeats still answer then, so only the reply's own pace
tells: every frame the inference child sends is progress (a batch of the prompt read, a batch
of tokens, a context shift), and a gap FACTOR times the slowest recent step, at least FLOOR
and at most CEILING seconds, is a stall. Before any step of this session was timed (the first
prompt batch after a load) only CEILING applies.
"""

from __future__ import annotations

import collections
import time

FLOOR = 6.0  # seconds: a shared, busy machine's hiccups stay below this
CEILING = 120.0  # seconds: the longest any step may take, however slow the set-up
FACTOR = 20.0
_RECENT = 32  # steps remembered per kind


class StallWatch:
    """Step times of a session's replies, by kind ("prompt": a batch of the prompt;
    "token": one generated token), and the bound they give for the next step."""

    def __init__(self) -> None:
        self._steps: dict[str, collections.deque[float]] = {
            "prompt": collections.deque(maxlen=_RECENT),
            "token": collections.deque(maxlen=_RECENT),
        }
        self._last = time.monotonic()
        self._next = "prompt"

    def fork(self) -> StallWatch:
        """A watch for a reply that runs beside another: the pace timed so far, its own
        clock."""
        other = StallWatch()
        for kind, steps in self._steps.items():
            other._steps[kind].extend(steps)
        return other

    def begin(self) -> None:
        """A reply starts: the prompt comes first."""
        self._last, self._next = time.monotonic(), "prompt"

    def saw(self, kind: str, n: int = 1) -> None:
        """`n` steps of `kind` ended now (a frame arrived; n=0: progress not timed, such
        as a context shift). Tokens mean the prompt is read."""
        now = time.monotonic()
        if n > 0:
            self._steps[kind].append((now - self._last) / n)
        self._last = now
        if kind == "token":
            self._next = "token"

    def after_prompt(self) -> None:
        """The prompt is read; the next frame brings tokens."""
        self._last, self._next = time.monotonic(), "token"

    def bound(self) -> float:
        """Seconds without a frame after which the reply counts as stalled."""
        steps = self._steps[self._next] or (
            self._steps["prompt"] if self._next == "token" else None
        )
        if not steps:
            return CEILING
        return min(CEILING, max(FLOOR, FACTOR * max(steps)))

    def describe(self) -> str:
        """The pace it judged by, for the message that says a reply stalled."""
        tokens, batches = self._steps["token"], self._steps["prompt"]
        if tokens:
            return f"a token took at most {max(tokens) * 1000:.0f} ms before"
        if batches:
            return f"a batch of the prompt took at most {max(batches):.1f} s before"
        return "nothing was timed yet"
