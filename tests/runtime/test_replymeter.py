"""The one reply meter every front end uses: text, KV with shifts, rate, stop."""

from __future__ import annotations

import pytest

from corral.engine.runtime.childproto import Done, Shift, Token
from corral.engine.runtime.errors import RuntimeFailure
from corral.engine.runtime.kvstatus import ReplyMeter


def _done(n_tokens: int, gen_s: float, shifts: int) -> Done:
    return Done("abc", "length", n_tokens, 5, 0, shifts, 0, (), 0, 7, 256, 0.1, gen_s)


def test_the_meter_counts_from_the_first_token_and_ends_with_the_childs_own_rate() -> None:
    now = [10.0]
    meter = ReplyMeter(None, clock=lambda: now[0])
    first = meter.feed(Token("a", 1, 6, 256))
    assert first.text == "a" and first.kv.used == 6 and first.kv.gen_tok_s == 0.0
    now[0] = 10.5  # the prompt's time before the first token is not in the rate
    second = meter.feed(Token("b", 2, 7, 256))
    assert second.kv.gen_tok_s == 2.0 and second.stop is None
    shift = meter.feed(Shift(n_keep=4, n_discard=100, shifts=3, kv_used=120, n_ctx=256))
    assert shift.shift is not None and shift.text == "" and shift.kv.shifts == 3
    assert meter.feed(Token("c", 3, 121, 256)).kv.shifts == 3
    end = meter.feed(_done(n_tokens=3, gen_s=0.5, shifts=3))
    assert end.stop == "length" and end.text == "" and end.kv.gen_tok_s == 6.0
    assert meter.finished() is end.done


def test_a_reply_without_its_summary_is_said_to_be_a_bug() -> None:
    meter = ReplyMeter(None)
    meter.feed(Token("a", 1, 6, 256))
    with pytest.raises(RuntimeFailure, match="without its summary"):
        meter.finished()
