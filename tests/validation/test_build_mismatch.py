"""An agent reporting another llama.cpp build is refused before its worker is touched."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import corral

_FAKE = r"""
import asyncio, sys
from pathlib import Path
from corral.engine.protocol import (PROTOCOL_VERSION, Hello, encode_frame, from_wire, read_frame,
    to_wire, ErrorReply)
from corral.engine.security.identity import load_or_create
from corral.engine.security.tls import server_context

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
    me = load_or_create(Path(sys.argv[2]), "agent", "old-box")
    ctx = server_context(me, [Path(sys.argv[3]).read_bytes()])
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def _run_fake(rpc_proto: str, tmp: Path) -> tuple[object, int]:
    """A fake agent with a real identity, paired with this test run's desktop."""
    import subprocess

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from corral.engine.security.desktop import desktop_keys
    from corral.engine.security.identity import load_or_create
    from corral.engine.security.pins import Peer

    tmp.mkdir(parents=True)
    keys = desktop_keys()
    der = x509.load_pem_x509_certificate(keys.identity.cert_path.read_bytes()).public_bytes(
        Encoding.DER
    )
    (tmp / "desktop.der").write_bytes(der)
    fake = load_or_create(tmp / "fake", "agent", "old-box")
    proc = subprocess.Popen(
        [sys.executable, "-c", _FAKE, rpc_proto, str(tmp / "fake"), str(tmp / "desktop.der")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    keys.pins.add(Peer(fake.fingerprint, "old-box", fake.cert_der, "ab" * 16, f"127.0.0.1:{port}"))
    return proc, port


def test_other_build_is_refused_before_any_worker_request(smollm2: Path, tmp_path: Path) -> None:
    for proto in ("7.0.0", "6.2.0"):
        proc, port = _run_fake(proto, tmp_path / proto)
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
