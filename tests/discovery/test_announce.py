"""A real announcement on loopback: the browser sees it, its update, and its goodbye."""

from __future__ import annotations

import asyncio
import dataclasses

from corral.discovery import Advertised, Advertiser, AgentHints, Browser, Event, Withdrawn


def test_advertise_update_and_goodbye_on_loopback() -> None:
    async def run() -> list[Event]:
        events: list[Event] = []
        browser = Browser(events.append, ips=("127.0.0.1",))
        await browser.start()
        hints = AgentHints("c" * 32, "0.1.0", "1.0", 0, 0, 7399)
        advertiser = Advertiser(hints, "127.0.0.1")
        await advertiser.start()

        async def until(pred: object, timeout: float = 10) -> None:
            for _ in range(int(timeout / 0.05)):
                if any(pred(e) for e in events):  # type: ignore[operator]
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(events)

        await until(lambda e: isinstance(e, Advertised) and e.hints.gpu_count == 0)
        await advertiser.update(dataclasses.replace(hints, gpu_count=2, vram_total=1 << 36))
        await until(lambda e: isinstance(e, Advertised) and e.hints.gpu_count == 2)
        await advertiser.close()
        await until(lambda e: isinstance(e, Withdrawn))
        await browser.close()
        return events

    events = asyncio.run(run())
    services = {e.service for e in events if isinstance(e, Advertised | Withdrawn)}
    assert len(services) == 1 and next(iter(services)).endswith("._corral._tcp.local.")
