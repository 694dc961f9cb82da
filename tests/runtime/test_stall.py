"""The stall watch's bound (pure): from the reply's own pace, within a floor and a ceiling.
The real thing (a stopped worker, a reply ended and the chat healed) is in test_failures."""

from __future__ import annotations

import pytest

from corral.engine.runtime import stall
from corral.engine.runtime.stall import StallWatch


def _timed(watch: StallWatch, monkeypatch: pytest.MonkeyPatch, steps: list[tuple[str, float, int]]):
    now = [100.0]
    monkeypatch.setattr(stall.time, "monotonic", lambda: now[0])
    watch.begin()
    for kind, seconds, n in steps:
        now[0] += seconds
        watch.saw(kind, n)
    return now


def test_nothing_timed_yet_waits_the_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    watch = StallWatch()
    _timed(watch, monkeypatch, [])
    assert watch.bound() == stall.CEILING
    assert watch.describe() == "nothing was timed yet"


def test_fast_tokens_give_the_floor_slow_ones_their_multiple(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    watch = StallWatch()
    _timed(watch, monkeypatch, [("prompt", 0.2, 1), ("token", 0.06, 2)])
    assert watch.bound() == stall.FLOOR  # 20 x 30 ms is under the floor
    slow = StallWatch()
    _timed(slow, monkeypatch, [("prompt", 1.0, 1), ("token", 0.9, 1)])
    assert slow.bound() == pytest.approx(stall.FACTOR * 0.9)
    crawling = StallWatch()
    _timed(crawling, monkeypatch, [("prompt", 1.0, 1), ("token", 30.0, 1)])
    assert crawling.bound() == stall.CEILING
    assert "a token took at most 30000 ms" in crawling.describe()


def test_the_prompt_is_judged_by_prompt_batches_and_the_first_token_by_them_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    watch = StallWatch()
    _timed(watch, monkeypatch, [("prompt", 2.0, 1)])
    assert watch.bound() == pytest.approx(40.0)  # the next batch of a long prompt
    watch.after_prompt()
    assert watch.bound() == pytest.approx(40.0)  # no token timed yet: the batch's pace
    watch.saw("token", 0)  # a context shift: progress, nothing timed
    watch.begin()  # the next reply starts with its prompt again
    assert watch.bound() == pytest.approx(40.0)
