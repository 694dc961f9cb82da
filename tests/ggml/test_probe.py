"""The ggml RPC HELLO probe, against a real RPC worker and against things that are not one."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from corral.engine.ggml.loadlog import compact_ranges, parse_load_log
from corral.engine.ggml.probe import RpcProbeError, probe_rpc
from corral.engine.localagents import LocalAgents
from corral.engine.runtime.agent_client import AgentClient


def test_a_real_worker_answers_with_its_protocol_version() -> None:
    async def version(address: str) -> int:
        client = AgentClient(address)
        await client.connect()
        await client.start_rpc(threads=1)
        tunnel = client.open_tunnel()  # the worker is reachable only through this
        try:
            got = await asyncio.get_running_loop().run_in_executor(None, tunnel.probe)
            return got[0]
        finally:
            tunnel.close()
            await client.close()

    with LocalAgents(1) as agents:
        assert asyncio.run(version(agents.addresses[0])) == 7


def test_nothing_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RpcProbeError, match="cannot reach RPC endpoint"):
        probe_rpc(f"127.0.0.1:{port}")


def _serve_once(reply: bytes) -> tuple[str, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def run() -> None:
        conn, _ = server.accept()
        conn.recv(64)
        conn.sendall(reply)
        conn.close()
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"127.0.0.1:{port}", thread


def test_a_server_that_hangs_up() -> None:
    endpoint, thread = _serve_once(b"")
    with pytest.raises(RpcProbeError, match="closed the connection at HELLO"):
        probe_rpc(endpoint)
    thread.join()


def test_another_protocol_generation() -> None:
    endpoint, thread = _serve_once((3).to_bytes(8, "little") + b"\x02\x00\x00")
    with pytest.raises(RpcProbeError, match="another ggml RPC protocol"):
        probe_rpc(endpoint, timeout=2)
    thread.join()


def test_bad_endpoint_text() -> None:
    with pytest.raises(RpcProbeError, match="expected HOST:PORT"):
        probe_rpc("localhost:notaport")


def test_load_log_parsing() -> None:
    report = parse_load_log(
        [
            "load_tensors: layer   0 assigned to device RPC0, is_swa = 0",
            "load_tensors: layer   1 assigned to device RPC1, is_swa = 0",
            "load_tensors:   RPC0[127.0.0.1:5000] model buffer size =    40.50 MiB",
            "llama_kv_cache:  RPC1[127.0.0.1:5001] KV buffer size =    11.25 MiB",
            "sched_reserve:        CPU compute buffer size =    98.25 MiB",
            "llama_context:        CPU  output buffer size =     0.19 MiB",
        ]
    )
    assert report.layers == {0: "RPC0", 1: "RPC1"}
    assert report.buffers["model"] == {"RPC0[127.0.0.1:5000]": 40.5}
    assert report.buffers["KV"] == {"RPC1[127.0.0.1:5001]": 11.25}
    assert report.buffers["compute"]["CPU"] == 98.25 and report.buffers["output"]["CPU"] == 0.19
    assert compact_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
