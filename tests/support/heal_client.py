"""An API client for the healing trials (bench/reliability.py --only heal-…), run as its own
process so it can sit in a network namespace beside `corral serve`.

    python -m tests.support.heal_client URL

It streams a long reply with the official openai SDK and prints one JSON line per event,
with time.monotonic() (one clock for every process of the machine): `streaming` once the
reply is under way (the parent injects its fault then), `error` when the SDK raised (what a
failure must look like) or `complete` when the stream ended normally (a reply cut short
that looks whole), then `usable` once a short request is answered, trying again until
USABLE_WITHIN s have passed.
"""

from __future__ import annotations

import json
import sys
import time

import openai

LONG = "Write the numbers from 1 to 1000 separated by commas."
USABLE_WITHIN = 120.0


def say(event: str, **extra: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **extra}), flush=True)


def main() -> int:
    url = sys.argv[1]
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id  # the one served: another name is a 404
    try:
        stream = client.chat.completions.create(
            model=model,
            stream=True,
            max_tokens=1500,
            temperature=0,
            messages=[{"role": "user", "content": LONG}],
        )
        for i, _ in enumerate(stream):
            if i == 3:
                say("streaming")
        say("complete")
    except openai.APIError as exc:
        say("error", message=str(exc)[:500])
    start, last = time.monotonic(), ""
    while time.monotonic() - start < USABLE_WITHIN:
        try:
            reply = client.chat.completions.create(
                model=model,
                max_tokens=4,
                temperature=0,
                messages=[{"role": "user", "content": "Hello!"}],
            )
        except openai.APIError as exc:
            last = str(exc)[:300]
            time.sleep(0.5)
            continue
        say("usable", text=reply.choices[0].message.content or "")
        return 0
    say("unusable", message=last)
    return 1


if __name__ == "__main__":
    sys.exit(main())
