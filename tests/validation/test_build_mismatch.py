"""An agent reporting another llama.cpp build is refused before its worker is touched."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import corral

_FAKE = r"""
import asyncio, sys
from corral.engine.protocol import (PROTOCOL_VERSION, Hello, encode_frame, from_wire, read_frame,
    to_wire, ErrorReply)

async def serve(reader, writer):
    await read_frame(reader)
    writer.write(encode_frame(to_wire(Hello(role="agent", proto_major=PROTOCOL_VERSION[0],
        proto_minor=PROTOCOL_VERSION[1], llama_version="0.3.20", llama_commit="f00dbee",
        rpc_proto=sys.argv[1], agent_id="ab" * 16, hostname="old-box"))))
    while (frame := await read_frame(reader)) is not None:
        msg = from_wire(frame)
        print(type(msg).__name__, flush=True)   # the test reads what was asked of us
        writer.write(encode_frame(to_wire(ErrorReply(req=msg.req, code=8, message="fake"))))

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def _run_fake(rpc_proto: str) -> tuple[object, int]:
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-c", _FAKE, rpc_proto], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_other_build_is_refused_before_any_worker_request(smollm2: Path) -> None:
    for proto in ("7.0.0", "6.2.0"):
        proc, port = _run_fake(proto)
        try:
            done = corral(
                "chat", str(smollm2), "--agent", f"127.0.0.1:{port}", "--prompt", "hi", "--json"
            )
        finally:
            proc.kill()  # type: ignore[attr-defined]
            asked, _ = proc.communicate()  # type: ignore[attr-defined]
        assert done.returncode == 2, done.stdout + done.stderr
        message = json.loads(done.stdout.splitlines()[-1])["message"]
        assert "old-box" in message and "0.3.36" in message
        assert ("f00dbee" in message) if proto == "7.0.0" else ("protocol 6.2.0" in message)
        # nothing was asked of the agent: no StartRpc, so no worker, no RPC connection
        assert asked.strip() == "", asked
