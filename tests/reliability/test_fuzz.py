"""The fuzz targets with a small budget (bench/fuzz.py runs 100,000+ cases), and the one
property no budget can show: a header that claims a huge frame is refused before the body
is read or allocated."""

from __future__ import annotations

import asyncio
import struct
import tracemalloc

import pytest

from corral.engine.protocol import MAX_FRAME, FrameDecoder, ProtocolError, read_frame
from tests.support import fuzz

CASES = 150


@pytest.mark.parametrize("target", fuzz.targets(), ids=lambda t: t.name)
def test_fuzz_target(target: fuzz.Target) -> None:
    stats = fuzz.run(target, CASES, derandomize=True)
    assert stats.cases >= CASES // 2, stats
    assert stats.slowest_s < fuzz.CASE_LIMIT_S, stats


@pytest.mark.parametrize("claimed", [MAX_FRAME + 1, 2**31, 2**32 - 1])
def test_huge_frame_header_is_refused_before_allocation(claimed: int) -> None:
    header = struct.pack(">I", claimed)
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds"):
            FrameDecoder().feed(header)

        async def stream() -> None:
            reader = asyncio.StreamReader()
            reader.feed_data(header)  # no body, no EOF: reading on would wait forever
            await asyncio.wait_for(read_frame(reader), 1.0)

        with pytest.raises(ProtocolError, match="exceeds"):
            asyncio.run(stream())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak} bytes allocated to refuse a {claimed}-byte claim"
