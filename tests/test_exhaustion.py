"""Unauthenticated clients cannot exhaust the manager (issue 11 part 4), on real sockets.

The metrics HTTP server bounds its connections and threads and times out idle, half-sent
and never-reading clients; a manager boxed into few fds survives a flood of them.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
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
    toml_dump,
    write_config,
)

from devmgr import Client, ControlError, ManagerUnreachable
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


def _has_pending_data(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


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
        # every connection accepted and answered first (looking for no request thread at
        # once raced their accept: the slots were taken after the check)...
        wait_until(
            lambda: all(_has_pending_data(s) for s in socks),
            timeout=10,
            what="an answer waiting on every connection",
        )
        # ...then the slots given back, at the deadline at the latest
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


# ---- file descriptors ------------------------------------------------------------------------


class _BoxedManager(ManagerProc):
    """`devmgr start` started with RLIMIT_NOFILE set to (soft, hard), as `ulimit -n` does."""

    def __init__(self, config_path: Path, *, control: str, nofile: tuple[int, int]) -> None:
        super().__init__(config_path, control=control)
        self.nofile = nofile

    def start(self) -> _BoxedManager:
        # set in the child's own Python before devmgr runs (preexec_fn is unsafe here)
        boot = (
            "import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, {self.nofile!r}); "
            "sys.argv = ['devmgr', *sys.argv[1:]]; "
            "runpy.run_module('devmgr', run_name='__main__', alter_sys=True)"
        )
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", boot, "start", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,
            )
        return self


def _nofile_of(pid: int) -> tuple[int, int]:
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)


def _answers(control: str) -> bool:
    try:
        with Client(control, timeout=5) as client:
            return client.ping() == "pong"
    except ManagerUnreachable:
        return False


def test_soft_fd_limit_is_raised_and_add_is_refused_before_it_runs_out(ipc_dir: Path) -> None:
    """Started under `ulimit -Sn 64` with a hard limit of 128, the manager raises its soft
    limit to 128 (and logs it). Devices added one by one run until the next one would eat
    into the fds kept for the manager: that `add` gets an error reply naming the limit,
    nothing of it is kept, and every device already running keeps running (before, the
    forkserver or the manager died of EMFILE and took every device with it)."""
    config = {"manager": manager_settings(ipc_dir), "devices": {}}
    path = write_config(ipc_dir / "fds.toml", config)
    control = config["manager"]["control"]
    with _BoxedManager(path, control=control, nofile=(64, 128)) as mgr:
        wait_until(lambda: _answers(control), timeout=20, what="the manager to answer")
        assert _nofile_of(mgr.pid) == (128, 128)
        assert "raised the open file limit (RLIMIT_NOFILE) from 64 to 128" in mgr.log()
        running: dict[str, int] = {}
        refusal = None
        with Client(control, timeout=20) as client:
            for i in range(40):
                name = f"d{i}"
                spec = {"name": name, **pipeline_device(endpoints(ipc_dir, name))}
                try:
                    result = client.add(spec)
                except ControlError as exc:
                    refusal = exc
                    break
                assert result["state"] == "running", result
                running[name] = result["pid"]
            assert refusal is not None, f"40 devices started under a limit of 128: {running}"
            assert "file descriptors" in refusal.message and "128" in refusal.message
            assert len(running) >= 3
            assert client.ping() == "pong"
            devices = {d["name"]: d for d in client.status()["devices"]}
        assert set(devices) == set(running)  # the refused one is not kept
        assert {n: d["pid"] for n, d in devices.items()} == running
        assert all(d["state"] == "running" and d["last_exit"] is None for d in devices.values())
        assert mgr.terminate(timeout=20) == 0


def test_fifty_devices_under_ulimit_64_do_not_abort_the_manager(ipc_dir: Path) -> None:
    """`ulimit -n 64` (soft and hard) and a config of 50 devices: the manager starts what
    fits, reports the others as failed starts with the reason, keeps answering, and stops
    with exit 0 (it aborted in libzmq on EMFILE)."""
    names = [f"d{i:02d}" for i in range(50)]
    restart = {"policy": "on-failure", "max_restarts": 1, "backoff_initial": 0.05}
    config = {
        "manager": manager_settings(ipc_dir),
        "devices": {n: pipeline_device(endpoints(ipc_dir, n), restart=restart) for n in names},
    }
    path = write_config(ipc_dir / "fifty.toml", config)
    control = config["manager"]["control"]
    with _BoxedManager(path, control=control, nofile=(64, 64)) as mgr:
        wait_until(lambda: _answers(control), timeout=30, what="the manager to answer")

        def settled() -> dict[str, dict[str, Any]]:
            assert mgr.proc is not None and mgr.proc.poll() is None, mgr.log()[-3000:]
            devices = mgr.devices()
            states = {d["state"] for d in devices.values()}
            assert states <= {"running", "fatal"}, states
            return devices

        devices = wait_until(settled, timeout=30, interval=0.1, what="every device settled")
        up = [n for n, d in devices.items() if d["state"] == "running"]
        down = [d for d in devices.values() if d["state"] == "fatal"]
        assert up and down
        assert all("file descriptors" in (d["message"] or "") for d in down), down[:2]
        assert _answers(control)
        assert mgr.terminate(timeout=30) == 0


# ---- connections that never finish their handshake --------------------------------------------


def test_handshakeless_connections_to_curve_control_are_bounded(ipc_dir: Path) -> None:
    """300 tcp connections to a CURVE control port that never send a greeting: the
    manager holds at most 64 of them (its fds stay bounded), closes each one that has
    not finished its handshake within 5 s, answers an authorised client meanwhile and
    restarts a killed device (before: +300 fds held for 30 s, and spawns failed with
    EMFILE while it lasted)."""
    from devmgr._security import create_certificate_pair

    manager_public, _ = create_certificate_pair(ipc_dir / "keys", "manager")
    client_public, client_secret = create_certificate_pair(ipc_dir / "clients", "alice")
    (ipc_dir / "keys" / "authorized").mkdir()
    shutil.copy(client_public, ipc_dir / "keys" / "authorized")
    port = free_port()
    control = f"tcp://127.0.0.1:{port}"
    ep = endpoints(ipc_dir, "a")
    config = {
        "manager": manager_settings(ipc_dir, control=control),
        "devices": {"a": pipeline_device(ep)},
    }
    path = ipc_dir / "curve.toml"
    text = toml_dump(config)
    text += '[manager.curve]\nsecret_key = "keys/manager.key_secret"\n'
    text += 'authorized_keys = "keys/authorized"\n'
    path.write_text(text)
    curve = (client_secret, manager_public)
    mgr = ManagerProc(path, control=control)
    held: list[socket.socket] = []
    with mgr:

        def up() -> bool:
            assert mgr.proc is not None and mgr.proc.poll() is None, mgr.log()[-2000:]
            try:
                with Client(control, timeout=1, curve=curve) as client:
                    return client.status()["devices"][0]["state"] == "running"
            except ManagerUnreachable:
                return False

        wait_until(up, timeout=20, what="the CURVE manager with its device running")
        with Client(control, timeout=5, curve=curve) as client:
            pid = client.status()["devices"][0]["pid"]
        fds_before = psutil.Process(mgr.pid).num_fds()
        try:
            for _ in range(300):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            wait_until(
                lambda: psutil.Process(mgr.pid).num_fds() <= fds_before + 64 + 8,
                timeout=10,
                what="the manager to hold at most 64 of the connections",
            )
            with Client(control, timeout=10, curve=curve) as client:
                assert client.ping() == "pong"
                os.kill(pid, signal.SIGKILL)
                wait_until(
                    lambda: (
                        client.status()["devices"][0]["pid"] not in (None, pid)
                        and client.status()["devices"][0]["state"] == "running"
                    ),
                    timeout=15,
                    what="the killed device back",
                )
            # every held connection is closed by the manager: beyond the limit at once,
            # the others at the end of the 5 s handshake interval
            started = time.monotonic()
            for sock in held:
                assert _closed_by_server(sock, timeout=max(0.1, started + 10 - time.monotonic()))
            assert psutil.Process(mgr.pid).num_fds() <= fds_before + 8
        finally:
            for sock in held:
                sock.close()
        assert mgr.terminate(timeout=15) == 0
