"""The tunnel's in-process data path (engine/security/_rpcshim.c) in real processes: a Python
program with the shim preloaded stands in for ggml-rpc (the same five socket calls), and this
test is the handing side (the desktop or the agent) and the far end of the records, which it
seals and opens with an independent AES-GCM (tests/support/relay.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.engine.security import tunnel
from corral.engine.security.tunnel import TUNNEL_HOST, hand_over, handover_hello, plain_to_worker
from tests.support.relay import read_record, recv_exactly, seal

SHIM = tunnel.shim_file()
PORT = 1  # a tunnel label: only the shim's hand-over socket FOLDER/1 answers it


def test_the_shim_is_built() -> None:
    """`make test` builds it beside the relay; tunnels then hand connections over."""
    assert SHIM, "engine/security/_rpcshim.c was not built: see setup.py"
    assert tunnel.relay_mode() == "inproc"


@pytest.fixture
def folder() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="corral-t-", dir="/tmp")  # the shim takes up to 79 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=dict(os.environ, LD_PRELOAD=SHIM, CORRAL_RPCSHIM_PRELOAD_WAS="", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


CLIENT = f"""
    import errno, os, socket
    try:
        s = socket.create_connection(("{TUNNEL_HOST}", {PORT}), timeout=10)
    except OSError as exc:
        print("connect", errno.errorcode.get(exc.errno, exc.errno)); raise SystemExit
    s.settimeout(None)  # blocking, as ggml-rpc's sockets are
    s.sendall(b"ping")
    s.sendall(b"x" * 300000)  # more than one record
    got = b""
    try:
        while len(got) < 6:
            more = s.recv(6 - len(got))
            if not more:
                break
            got += more
        print("got", got.decode())
    except OSError as exc:
        print("recv", errno.errorcode.get(exc.errno, exc.errno))
    print("env", os.environ.get("LD_PRELOAD", ""), os.environ.get("CORRAL_RPCSHIM_CONNECT", ""))
    s.close()
"""


def _keys() -> tuple[bytes, bytes, bytes, bytes]:
    return os.urandom(32), os.urandom(12), os.urandom(32), os.urandom(12)


def _take_sent(sock: socket.socket, key: bytes, iv: bytes) -> int:
    """Read what CLIENT sends as records; how many records it took."""
    sent, seq = b"", 0
    while len(sent) < 4 + 300000:
        sent += read_record(sock, key, iv, seq)
        seq += 1
    assert sent == b"ping" + b"x" * 300000
    return seq


@contextlib.contextmanager
def _handing(folder: str, port: int = PORT) -> Iterator[socket.socket]:
    """The desktop's side: a hand-over socket at FOLDER/PORT."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(os.path.join(folder, str(port)))
        srv.listen(1)
        srv.settimeout(20)
        yield srv


@contextlib.contextmanager
def _handed_client(
    folder: str, keys: tuple[bytes, bytes, bytes, bytes], code: str = CLIENT
) -> Iterator[tuple[subprocess.Popen[str], socket.socket, socket.socket, socket.socket]]:
    """`code` run with the shim, its connection handed over by this test as the desktop
    does: yields the program, the Unix connection it asked on, this test's end of the
    connection, and the end it was handed (the desktop's copy, still open)."""
    with _handing(folder) as srv:
        client = _run(code, {"CORRAL_RPCSHIM_CONNECT": folder})
        unix, _ = srv.accept()
        near, far = socket.socketpair()
        with unix, near, far:
            hand_over(unix, far, keys, b"")
            yield client, unix, near, far


def test_a_handed_connection_carries_records_both_ways(folder: str) -> None:
    tx_key, tx_iv, rx_key, rx_iv = keys = _keys()  # the client's point of view
    with _handed_client(folder, keys) as (client, _, near, far):
        far.close()
        assert _take_sent(near, tx_key, tx_iv) >= 3  # 256 KiB records at most
        # the second record is longer than the recv that reads it: the rest waits
        near.sendall(seal(rx_key, rx_iv, 0, b"po") + seal(rx_key, rx_iv, 1, b"ngpo!!"))
        out, err = client.communicate(timeout=20)
        assert near.recv(1) == b""  # closing it shut the connection down
    assert "got pongpo" in out, err
    assert "env  " in out  # the shim's variables are gone from what the program sees


def test_a_record_that_fails_authentication_is_an_error_not_data(folder: str) -> None:
    keys = _keys()
    with _handed_client(folder, keys) as (client, _, near, far):
        far.close()
        _take_sent(near, keys[0], keys[1])
        bad = bytearray(seal(keys[2], keys[3], 0, b"pongpo"))
        bad[6] ^= 1
        near.sendall(bytes(bad))
        out, err = client.communicate(timeout=20)
    assert "recv EBADMSG" in out, (out, err)


def test_a_refused_hand_over_is_a_refused_connection(folder: str) -> None:
    """The desktop could not open the tunnel (agent refused, unreachable): it closes."""
    with _handing(folder) as srv:
        client = _run(CLIENT, {"CORRAL_RPCSHIM_CONNECT": folder})
        unix, _ = srv.accept()
        unix.close()
        out, err = client.communicate(timeout=20)
    assert "connect ECONNREFUSED" in out, (out, err)


def test_a_tunnel_label_never_becomes_a_tcp_connection(folder: str) -> None:
    """No hand-over socket for the label (that tunnel closed): refused, even where another
    local user listens on the tunnel address's port over TCP."""
    with socket.create_server((TUNNEL_HOST, 0)) as squatter:
        port = squatter.getsockname()[1]
        code = CLIENT.replace(f'"{TUNNEL_HOST}", {PORT}', f'"{TUNNEL_HOST}", {port}')
        client = _run(code, {"CORRAL_RPCSHIM_CONNECT": folder})
        out, err = client.communicate(timeout=20)
        squatter.settimeout(0.2)
        with pytest.raises(TimeoutError):
            squatter.accept()
    assert "connect ECONNREFUSED" in out, (out, err)


def test_mode_p_hands_over_a_plain_stream(folder: str) -> None:
    """An agent without the record layer: the desktop pumps TLS, the Unix socket is plain."""
    with _handing(folder) as srv:
        client = _run(CLIENT, {"CORRAL_RPCSHIM_CONNECT": folder})
        unix, _ = srv.accept()
        with unix:
            unix.sendall(handover_hello(b"P"))
            assert recv_exactly(unix, 4 + 300000) == b"ping" + b"x" * 300000
            unix.sendall(b"plain!")
            out, err = client.communicate(timeout=20)
    assert "got plain!" in out, err


def test_other_connections_pass_through(folder: str) -> None:
    """Any address but the tunnel's: an ordinary TCP connection, bytes untouched."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        code = CLIENT.replace(f'"{TUNNEL_HOST}", {PORT}', f'"127.0.0.1", {port}')
        client = _run(code, {"CORRAL_RPCSHIM_CONNECT": folder})
        srv.settimeout(20)
        conn, _ = srv.accept()
        with conn:
            assert recv_exactly(conn, 4 + 300000) == b"ping" + b"x" * 300000
            conn.sendall(b"direct")
            out, err = client.communicate(timeout=20)
    assert "got direct" in out, err


SERVER = f"""
    import ctypes, fcntl, os, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)
    srv = socket.create_server(("{TUNNEL_HOST}", int(sys.argv[1])))
    print("listening", flush=True)
    for i in range(2):
        fd = libc.accept(srv.fileno(), None, None)  # as ggml-rpc does: no flags
        c = socket.socket(fileno=fd)
        print("cloexec", bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC), flush=True)
        data = b""
        while len(data) < 5:
            data += c.recv(5 - len(data))
        if i == 1:  # a fork copies the handed connection: the child can send nothing
            pid = os.fork()
            if pid == 0:
                try:
                    c.send(b"leak!")
                    print("child sent", flush=True)
                except OSError as exc:
                    print("child refused", exc.errno, flush=True)
                os._exit(0)
            os.waitpid(pid, 0)
        c.sendall(data.upper())
        c.close()
    print("done", flush=True)
"""


def _worker(listen: str, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SERVER), str(port)],
        env=dict(
            os.environ,
            LD_PRELOAD=SHIM,
            CORRAL_RPCSHIM_PRELOAD_WAS="",
            CORRAL_RPCSHIM_LISTEN=listen,
            CORRAL_RPCSHIM_PORT=str(port),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_worker_side_takes_hand_overs_and_plain_clients_but_no_tcp(folder: str) -> None:
    """The agent's side: the worker binds no TCP port (a local user's HELLO is refused); its
    accept() returns a plain client on the Unix socket (mode 'P': the agent's probe, its
    relay fallback) and a handed connection. Closing a handed one ends it for the peer even
    though the agent still holds its copy (HandedOver's watch)."""
    port = 4242  # a label: nothing is bound
    listen = os.path.join(folder, "worker")
    server = _worker(listen, port)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        assert Path(listen).is_socket() and (Path(listen).stat().st_mode & 0o777) == 0o600
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((TUNNEL_HOST, port), timeout=10)
        # a plain client first
        with plain_to_worker(listen, 10) as plain:
            plain.sendall(b"hello")
            assert recv_exactly(plain, 5) == b"HELLO"
        # then a handed-over one, keyed from the agent's point of view
        tx_key, tx_iv, rx_key, rx_iv = keys = _keys()
        near, far = socket.socketpair()
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with near:
            unix.connect(listen)
            pending = seal(rx_key, rx_iv, 0, b"rec")  # arrived with the last TLS record
            hand_over(unix, far, keys, pending)
            near.sendall(seal(rx_key, rx_iv, 1, b"ds"))
            # the agent keeps its copy and the Unix connection, to end it or see it end
            watch = tunnel.HandedOver(far, unix)
            watch.start()
            # one send, one record: nothing the forked child tried reached the wire
            assert read_record(near, tx_key, tx_iv, 0) == b"RECDS"
            assert near.recv(1) == b""  # the worker closed it: shut down despite our copy
            assert watch.wait(10)
        out, err = server.communicate(timeout=10)
        assert server.returncode == 0, err
        assert out.count("cloexec True") == 2 and "child refused" in out, out
        assert "child sent" not in out
    finally:
        server.kill()
        server.communicate()


def test_a_worker_whose_unix_socket_cannot_listen_does_not_serve(folder: str) -> None:
    """Fail closed: no Unix listener, no server (and never a TCP one instead)."""
    server = _worker(os.path.join(folder, "missing", "worker"), 4243)
    out, err = server.communicate(timeout=20)
    assert server.returncode != 0 and "listening" not in out
    assert "corral rpcshim: cannot listen on" in err and "does not start" in err


def test_the_handing_side_ends_the_connection_when_the_process_dies(folder: str) -> None:
    """A killed inference child (or worker) closes nothing cleanly: the handing side sees
    its Unix connection end and shuts the connection down, so the far end is not left
    waiting on a copy only the handing side holds."""
    sleeper = CLIENT.replace('s.sendall(b"ping")', "import time; time.sleep(60)")
    with _handed_client(folder, _keys(), sleeper) as (client, unix, near, far):
        watch = tunnel.HandedOver(far, unix)  # the copy: as the desktop keeps it
        watch.start()
        client.kill()
        client.communicate()
        near.settimeout(10)
        assert near.recv(1) == b""
        assert watch.wait(10)
