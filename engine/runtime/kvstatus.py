"""What the KV cache holds right now, per device, and one reply as every front end meters
it (ReplyMeter): the chat window's status line, the CLI's and the API's figures."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.engine.planner.plan import Plan

from .childproto import Done, Event, Shift, Token
from .errors import RuntimeFailure


@dataclass(frozen=True, slots=True)
class KvStatus:
    used: int  # cells holding tokens
    n_ctx: int
    shifts: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    device_bytes: dict[str, int] = field(default_factory=dict)  # bytes in use per device
    gen_tok_s: float = 0.0

    @property
    def fill(self) -> float:
        return self.used / self.n_ctx if self.n_ctx else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "used": self.used,
            "n_ctx": self.n_ctx,
            "fill": round(self.fill, 4),
            "shifts": self.shifts,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "device_bytes": self.device_bytes,
            "gen_tok_s": round(self.gen_tok_s, 2),
        }


def kv_status(
    plan: Plan | None, used: int, n_ctx: int, shifts: int = 0, gen_tok_s: float = 0.0
) -> KvStatus:
    """KV status from the load's plan: each device's cache fills in proportion to the cells
    in use (every layer stores every cell)."""
    if plan is None:
        return KvStatus(used, n_ctx, shifts, gen_tok_s=gen_tok_s)
    share = used / n_ctx if n_ctx else 0.0
    per = {d.name: int(u.kv * share) for d, u in zip(plan.devices, plan.usage, strict=True)}
    if plan.host.kv:
        per["host"] = int(plan.host.kv * share)
    return KvStatus(used, n_ctx, shifts, plan.settings.type_k, plan.settings.type_v, per, gen_tok_s)


@dataclass(frozen=True, slots=True)
class ReplyUpdate:
    """What a front end shows after one event of a reply (ReplyMeter.feed)."""

    text: str  # what this event adds to the reply ("" for a shift or the end)
    kv: KvStatus  # cells in use, per device, shifts since the load, this reply's rate
    shift: Shift | None = None  # the context shift this event was
    done: Done | None = None  # the reply's summary, on its last event

    @property
    def stop(self) -> str | None:
        """eos | length | cancelled | context_full once the reply ended, else None."""
        return self.done.stop if self.done is not None else None


class ReplyMeter:
    """One reply as the CLI, the window and `corral serve` all see it: the text each event
    adds, the KV cache (per device, from the plan) with the context shifts since the load,
    and the rate. The rate runs from the first token, so the prompt's time is not in it:
    (tokens - 1) / (now - first token); at the end, the child's own count over its
    generation time."""

    def __init__(self, plan: Plan | None, clock: Callable[[], float] = time.perf_counter):
        self.plan = plan
        self.clock = clock
        self.tokens = 0
        self.shifts = 0
        self.first = 0.0
        self.rate = 0.0
        self.done: Done | None = None  # the reply's summary, once it came

    def feed(self, event: Event) -> ReplyUpdate:
        if isinstance(event, Token):
            now = self.clock()
            self.tokens += 1
            if self.tokens == 1:
                self.first = now
            elif now > self.first:
                self.rate = (self.tokens - 1) / (now - self.first)
            return ReplyUpdate(event.text, self._kv(event))
        if isinstance(event, Shift):
            self.shifts = event.shifts
            return ReplyUpdate("", self._kv(event), shift=event)
        self.shifts, self.done = event.shifts, event
        if event.gen_s > 0:
            self.rate = event.n_tokens / event.gen_s
        return ReplyUpdate("", self._kv(event), done=event)

    def finished(self) -> Done:
        """The reply's summary: generate() ends with it or raises, so its absence after the
        last event is a bug, said as one."""
        if self.done is None:
            raise RuntimeFailure("the reply ended without its summary; this is a bug in Corral")
        return self.done

    def _kv(self, event: Token | Shift | Done) -> KvStatus:
        return kv_status(self.plan, event.kv_used, event.n_ctx, self.shifts, self.rate)
