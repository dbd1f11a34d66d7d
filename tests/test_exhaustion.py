"""Unauthenticated clients cannot exhaust the manager (issue 11 part 4), on real sockets.

The metrics HTTP server bounds its connections and threads and times out idle, half-sent
and never-reading clients; a manager boxed into few fds survives a flood of them.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
from reliability.scenarios import free_port
from reliability.support import (
    ManagerProc,
    endpoints,
    manager_settings,
    pipeline_device,
    write_config,
)

from devmgr import Client
from devmgr._metrics import MetricsServer

from conftest import wait_until


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def _status() -> Mapping[str, Any]:
    return {"alive": True, "manager": {"version": "x", "uptime_s": 1.0}, "devices": []}


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed `sock` (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass  # a response (or the busy reply) before the close
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _request_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "devmgr-metrics-request")


@pytest.fixture
def small_server() -> Iterator[tuple[MetricsServer, int]]:
    server = MetricsServer(
        "127.0.0.1:0", _status, max_connections=4, idle_timeout=0.5, request_deadline=1.5
    )
    server.start()
    try:
        yield server, server.server_address[1]
    finally:
        server.stop()


def test_metrics_connections_and_threads_are_bounded(
    small_server: tuple[MetricsServer, int],
) -> None:
    """Idle connections take at most `max_connections` slots (one thread each); one more
    is answered 503 at once; the idle ones are closed after `idle_timeout`, and then the
    server answers again."""
    _server, port = small_server
    idle = [_connect(port) for _ in range(12)]
    try:
        wait_until(lambda: _request_threads() == 4, timeout=5, what="4 busy slots")
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert (status, body) == (503, b"busy\n")
        assert _request_threads() <= 4
        # every idle connection is closed by the server: the first 4 at their idle
        # timeout, the others at once with the busy reply
        for sock in idle:
            assert _closed_by_server(sock, timeout=5.0)
        wait_until(lambda: _request_threads() == 0, timeout=5, what="the slots to free")
        assert _get(f"http://127.0.0.1:{port}/healthz") == (200, b"ok\n")
    finally:
        for sock in idle:
            sock.close()


def test_metrics_slowloris_is_cut_at_the_request_deadline(
    small_server: tuple[MetricsServer, int],
) -> None:
    """A client that sends its request a byte at a time, each within the idle timeout,
    is closed at the request deadline (1.5 s here), not kept for as long as it goes on."""
    server, port = small_server
    sock = _connect(port)
    started = time.monotonic()
    closed_at = None
    try:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        for _ in range(50):  # at most 50 bytes, one every 0.2 s: 10 s in all
            try:
                sock.sendall(b"X")
            except OSError:
                closed_at = time.monotonic()
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(4096) == b"":
                    closed_at = time.monotonic()
                    break
            except TimeoutError:
                continue  # still open: the trickle goes on
            except ConnectionResetError:
                closed_at = time.monotonic()
                break
    finally:
        sock.close()
    assert closed_at is not None, "the server kept a trickling request open for 10 s"
    assert closed_at - started < 5.0
    assert server._httpd is not None and server._httpd.timed_out >= 1  # type: ignore[attr-defined]


def test_metrics_never_reading_client_is_cut(small_server: tuple[MetricsServer, int]) -> None:
    """Requests sent, replies never read: the slots come back at the deadline."""
    _server, port = small_server
    socks = []
    try:
        for _ in range(4):
            sock = _connect(port)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n" * 200)
            socks.append(sock)
        wait_until(lambda: _request_threads() == 0, timeout=10, what="the slots to free")
        assert _get(f"http://127.0.0.1:{port}/healthz") == (200, b"ok\n")
    finally:
        for sock in socks:
            sock.close()


def _threads_of(pid: int) -> int:
    return int(psutil.Process(pid).num_threads())


def test_metrics_flood_cannot_abort_a_manager_short_of_fds(ipc_dir: Path) -> None:
    """240 idle connections and a slowloris on the metrics port of a manager boxed into
    256 fds: the manager keeps its threads and fds bounded, answers `ping` (an ipc
    accept, which aborted in libzmq on EMFILE) and restarts a killed device (whose new
    child connects to the manager), and stops with exit 0."""
    port = free_port()
    eps = [endpoints(ipc_dir, n) for n in ("a", "b")]
    config = {
        "manager": manager_settings(ipc_dir, metrics=f"127.0.0.1:{port}"),
        "devices": {ep.name: pipeline_device(ep) for ep in eps},
    }
    path = write_config(ipc_dir / "flood.toml", config)
    control = config["manager"]["control"]
    flood: list[socket.socket] = []
    with ManagerProc(path, control=control) as mgr:
        pid_a = mgr.wait_running(2)["a"]["pid"]
        resource.prlimit(mgr.pid, resource.RLIMIT_NOFILE, (256, 256))
        threads_before = _threads_of(mgr.pid)
        fds_before = psutil.Process(mgr.pid).num_fds()
        try:
            for _ in range(240):
                flood.append(_connect(port))
            slow = _connect(port)
            flood.append(slow)
            slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            with Client(control, timeout=5) as client:
                assert client.ping() == "pong"
            os.kill(pid_a, signal.SIGKILL)
            wait_until(
                lambda: (
                    mgr.devices()["a"]["pid"] not in (None, pid_a)
                    and mgr.devices()["a"]["state"] == "running"
                ),
                timeout=15,
                what="the killed device back",
            )
            assert mgr.proc is not None and mgr.proc.poll() is None, mgr.log()[-2000:]
            assert _threads_of(mgr.pid) <= threads_before + 16 + 2
            assert psutil.Process(mgr.pid).num_fds() <= fds_before + 16 + 8
        finally:
            for sock in flood:
                sock.close()
        assert mgr.terminate(timeout=15) == 0
