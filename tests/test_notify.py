"""sd_notify: a real AF_UNIX datagram socket stands in for systemd."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmgr._notify import SdNotify

from conftest import wait_until


@pytest.fixture
def systemd_socket(ipc_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket playing systemd's notify socket; yields (socket, path)."""
    path = str(ipc_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5.0)
    try:
        yield sock, path
    finally:
        sock.close()


def _recv(sock: socket.socket, timeout: float = 5.0) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def _fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n") if line)


# ---- the class on its own -----------------------------------------------------------------


def test_no_socket_means_no_op() -> None:
    notify = SdNotify({})
    assert not notify.enabled
    assert notify.watchdog_interval() is None
    assert notify.ready() is False
    assert notify.status("x") is False
    assert notify.watchdog() is False
    notify.close()


def test_messages_arrive_on_a_path_socket(systemd_socket: tuple[socket.socket, str]) -> None:
    sock, path = systemd_socket
    notify = SdNotify({"NOTIFY_SOCKET": path})
    try:
        assert notify.enabled
        assert notify.ready()
        assert _recv(sock) == "READY=1"
        assert notify.status("3 running,\n1 backoff")
        assert _recv(sock) == "STATUS=3 running, 1 backoff"  # one line, always
        assert notify.stopping()
        assert _recv(sock) == "STOPPING=1"
        assert notify.watchdog()
        assert _recv(sock) == "WATCHDOG=1"
    finally:
        notify.close()


def test_reloading_carries_the_monotonic_time(systemd_socket: tuple[socket.socket, str]) -> None:
    sock, path = systemd_socket
    notify = SdNotify({"NOTIFY_SOCKET": path})
    try:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notify.reloading()
        fields = _fields(_recv(sock))
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= after
    finally:
        notify.close()


def test_abstract_namespace_socket() -> None:
    name = f"devmgr-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    notify = SdNotify({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notify.ready()
        assert _recv(sock) == "READY=1"
    finally:
        notify.close()
        sock.close()


def test_failures_are_swallowed(ipc_dir: Path) -> None:
    # Nobody listens at the path: sending fails, and the caller only gets False.
    notify = SdNotify({"NOTIFY_SOCKET": str(ipc_dir / "nobody"), "WATCHDOG_USEC": "1000000"})
    try:
        assert notify.enabled
        assert notify.ready() is False
        assert notify.watchdog() is False
    finally:
        notify.close()
    assert SdNotify({"NOTIFY_SOCKET": "vsock:2:1234"}).ready() is False  # unsupported kind


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "300000", "WATCHDOG_PID": str(os.getpid())}, 0.15),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),  # for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    notify = SdNotify({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert notify.watchdog_interval() == interval
    # Without a socket there is nobody to feed, whatever WATCHDOG_USEC says.
    assert SdNotify(env).watchdog_interval() is None


def test_reads_the_process_environment(
    systemd_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = systemd_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notify = SdNotify()
    try:
        assert notify.watchdog_interval() == 1.0
        assert notify.watchdog()
        assert _recv(sock) == "WATCHDOG=1"
    finally:
        notify.close()


# ---- a real manager under a stand-in systemd ------------------------------------------------


def test_manager_notifies_ready_watchdog_and_stopping(
    systemd_socket: tuple[socket.socket, str], ipc_dir: Path
) -> None:
    import zmq

    sock, path = systemd_socket
    config = ipc_dir / "devmgr.toml"
    config.write_text(
        f"""
[manager]
control = "ipc://{ipc_dir}/control"
stop_timeout = 2.0

[devices.s]
kind = "streamer"
in = {{ type = "PULL", bind = ["ipc://{ipc_dir}/in"] }}
out = {{ type = "PUSH", bind = ["ipc://{ipc_dir}/out"] }}
"""
    )
    env = {
        **os.environ,
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "400000",  # feed every 0.2 s
    }
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "devmgr", "start", "-c", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ctx = zmq.Context()
    try:
        messages: list[str] = []
        while "READY=1" not in messages:
            messages.append(_recv(sock, timeout=15.0))
        # READY=1 means the autostart device runs: it forwards at once.
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        for s in (push, pull):
            s.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 2000)
        pull.setsockopt(zmq.RCVTIMEO, 2000)
        push.connect(f"ipc://{ipc_dir}/in")
        pull.connect(f"ipc://{ipc_dir}/out")
        push.send(b"hello")
        assert pull.recv() == b"hello"
        push.close()
        pull.close()
        assert any(m.startswith("STATUS=") and "1 running" in m for m in messages), messages

        # WATCHDOG=1 keeps coming, about every 0.2 s (half of WATCHDOG_USEC).
        stamps: list[float] = []
        deadline = time.monotonic() + 10.0
        while len(stamps) < 6 and time.monotonic() < deadline:
            if _recv(sock) == "WATCHDOG=1":
                stamps.append(time.monotonic())
        assert len(stamps) == 6
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        mean = sum(gaps) / len(gaps)
        # Tolerance: a shared 2-core machine delays timers, but never by a whole period
        # on average; faster than 0.1 s would mean the interval was misread.
        assert 0.1 <= mean <= 0.35, gaps

        proc.send_signal(signal.SIGTERM)
        seen: list[str] = []
        while "STOPPING=1" not in seen:
            seen.append(_recv(sock))
        assert proc.wait(timeout=15) == 0
    finally:
        ctx.destroy(linger=0)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_manager_without_notify_socket_runs_as_before(ipc_dir: Path) -> None:
    # No NOTIFY_SOCKET (a terminal, a container): nothing is sent, nothing breaks.
    from devmgr import Manager
    from devmgr._config import parse_config

    config = parse_config(
        {
            "manager": {"control": f"ipc://{ipc_dir}/control"},
            "devices": {
                "s": {
                    "kind": "streamer",
                    "in": {"type": "PULL", "bind": [f"ipc://{ipc_dir}/in"]},
                    "out": {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/out"]},
                }
            },
        }
    )
    env_before = os.environ.pop("NOTIFY_SOCKET", None)
    try:
        with Manager(config) as manager:
            wait_until(lambda: manager.status()["devices"][0]["state"] == "running", 10.0)
    finally:
        if env_before is not None:
            os.environ["NOTIFY_SOCKET"] = env_before
