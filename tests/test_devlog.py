"""Device logs (issue 13 item 5): each device's stderr, captured per device by the manager.

A real device child is made to write a traceback and die: with PYTHONFAULTHANDLER=1 in
the manager's environment (which its zygote and devices inherit), a SIGABRT, as a libzmq
assertion raises it, makes the device dump its Python stack to stderr and die.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import zmq
from ctl_support import devmgr_command, private_env, streamer, write_config

from devmgr import Client, ControlError
from devmgr._devlog import BUFFER_LINES, LOG_RATE, MAX_LINE, DeviceLog, StderrPipe, new_pipe

from conftest import wait_until

CRASH_LINE = "Fatal Python error: Aborted"


class Lines:
    """The lines of a subprocess's stream, read by a thread as they come."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            with self._lock:
                self.lines.append(raw.decode().rstrip("\n"))

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def join(self) -> None:
        self._thread.join(10)


@pytest.fixture
def manager(ipc_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Lines, Client, Path]]:
    config = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    env = private_env(ipc_dir, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(
        [*devmgr_command(), "start", "-c", str(config), "--log-format", "json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines = Lines(proc.stderr)
    client = Client(f"ipc://{ipc_dir}/control", timeout=5.0)
    try:
        wait_until(lambda: _running_pid(client), timeout=20, what="device a running")
        yield proc, lines, client, config
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        lines.join()
        proc.stderr.close()


def _running_pid(client: Client, not_pid: int | None = None) -> int | None:
    try:
        (dev,) = client.status()["devices"]
    except Exception:
        return None
    if dev["state"] == "running" and dev["pid"] != not_pid:
        return int(dev["pid"])
    return None


def _crash(client: Client) -> int:
    """SIGABRT the running device: it writes its stack to stderr and dies; return its pid."""
    pid = _running_pid(client)
    assert pid is not None
    os.kill(pid, signal.SIGABRT)
    return pid


def _cli(config: Path, ipc_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*devmgr_command(), *args, "-c", str(config)],
        env=private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_crashing_device_s_stderr_reaches_the_log_the_event_status_and_logs(
    ipc_dir: Path, manager: tuple[subprocess.Popen[bytes], Lines, Client, Path]
) -> None:
    _proc, lines, client, config = manager
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"device.exited")
    sub.connect(f"ipc://{ipc_dir}/events")
    try:
        # a SUB joins late: make sure it is subscribed before the crash (a restart is seen)
        def subscribed() -> bool:
            client.restart("a")
            return sub.poll(500) != 0

        wait_until(subscribed, timeout=10, what="the events subscription")
        while sub.poll(0):
            sub.recv_multipart()
        wait_until(lambda: _running_pid(client), timeout=10, what="running again")
        pid = _crash(client)

        assert sub.poll(10_000), "no device.exited event"
        topic, body = sub.recv_multipart()
        event = json.loads(body)
    finally:
        sub.close()
        ctx.destroy(linger=0)
    assert topic == b"device.exited" and event["pid"] == pid
    assert event["signal"] == signal.SIGABRT
    assert CRASH_LINE in event["stderr"], event
    assert any("in main" in line for line in event["stderr"]), event  # the stack: _child.main

    # status: last_exit carries the same lines
    wait_until(lambda: _running_pid(client, not_pid=pid), timeout=10, what="the restart")
    (dev,) = client.status()["devices"]
    assert dev["last_exit"]["stderr"] == event["stderr"]

    # the manager's log: one JSON object per line, the device's lines with its name
    def logged() -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in lines.snapshot()]  # every line is JSON
        return [e for e in entries if e.get("line") == CRASH_LINE]

    (entry,) = wait_until(logged, timeout=5, what="the crash line in the manager's log")
    assert entry["device"] == "a" and entry["pid"] == pid and entry["stream"] == "stderr"
    assert entry["logger"] == "devmgr.device" and entry["msg"] == f"a[{pid}]: {CRASH_LINE}"
    exited = [json.loads(x) for x in lines.snapshot() if '"device.exited"' in x]
    assert any(e.get("pid") == pid and CRASH_LINE in e["stderr"] for e in exited)

    # devmgr logs prints them from the buffer, as tail does
    result = _cli(config, ipc_dir, "logs", "a", "-n", "500")
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    assert CRASH_LINE in printed and printed[-1] == event["stderr"][-1]
    last3 = _cli(config, ipc_dir, "logs", "a", "-n", "3")
    assert last3.stdout.splitlines() == event["stderr"][-3:]
    as_json = _cli(config, ipc_dir, "logs", "a", "-n", "1", "--json")
    (one,) = [json.loads(x) for x in as_json.stdout.splitlines()]
    assert one["pid"] == pid and one["line"] == event["stderr"][-1] and one["seq"] >= 1
    # the Client method
    got = client.logs("a", lines=2)
    assert [x["line"] for x in got["lines"]] == event["stderr"][-2:]
    assert got["device"] == "a" and got["dropped"] == 0


def test_logs_follow_prints_new_lines_as_they_come(
    ipc_dir: Path, manager: tuple[subprocess.Popen[bytes], Lines, Client, Path]
) -> None:
    _proc, _lines, client, config = manager
    first = _crash(client)
    wait_until(lambda: _running_pid(client, not_pid=first), timeout=10, what="the restart")
    follower = subprocess.Popen(
        [*devmgr_command(), "logs", "a", "-n", "1", "-f", "--interval", "0.05", "-c", str(config)],
        env=private_env(ipc_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert follower.stdout is not None and follower.stderr is not None
    out = Lines(follower.stdout)
    try:
        wait_until(lambda: len(out.snapshot()) == 1, timeout=10, what="the last line")
        second = _crash(client)
        wait_until(
            lambda: out.snapshot().count(CRASH_LINE) == 1, timeout=10, what="the new crash lines"
        )
        wait_until(lambda: _running_pid(client, not_pid=second), timeout=10, what="the restart")
        # every line of the second crash, once each, in order
        stderr = client.status()["devices"][0]["last_exit"]["stderr"]
        wait_until(lambda: out.snapshot()[1:] == stderr, timeout=10, what="all of them")
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(10) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        out.join()
        follower.stdout.close()
        follower.stderr.close()


def test_logs_refuses_bad_input(
    ipc_dir: Path, manager: tuple[subprocess.Popen[bytes], Lines, Client, Path]
) -> None:
    _proc, _lines, client, config = manager
    with pytest.raises(ControlError) as unknown:
        client.logs("nope")
    assert unknown.value.code == "unknown_device"
    with pytest.raises(ControlError) as too_many:
        client.logs("a", lines=BUFFER_LINES + 1)
    assert too_many.value.code == "bad_request"
    with pytest.raises(ControlError) as negative:
        client.request("logs", {"name": "a", "after": -1})
    assert negative.value.code == "bad_request"
    usage = _cli(config, ipc_dir, "logs", "a", "-n", "-1")
    assert usage.returncode == 2 and "-n must be between 0" in usage.stderr
    missing = _cli(config, ipc_dir, "logs", "nope")
    assert missing.returncode == 1 and "unknown_device" in missing.stderr
    assert _running_pid(client)  # the manager is unharmed


def test_text_log_names_the_device(ipc_dir: Path) -> None:
    """Under the default text format a device's line reads `WARNING a[PID]: ...`."""
    config = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    proc = subprocess.Popen(
        [*devmgr_command(), "start", "-c", str(config)],
        env=private_env(ipc_dir, PYTHONFAULTHANDLER="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    lines = Lines(proc.stderr)
    try:
        with Client(f"ipc://{ipc_dir}/control", timeout=5.0) as client:
            wait_until(lambda: _running_pid(client), timeout=20, what="device a running")
            pid = _crash(client)
            expected = f"WARNING a[{pid}]: {CRASH_LINE}"
            wait_until(
                lambda: any(line.endswith(expected) for line in lines.snapshot()),
                timeout=10,
                what="the device's line in the text log",
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines.join()
        proc.stderr.close()


# ---- the buffer and the pipe, on real pipes ---------------------------------------------


def test_pipe_lines_partial_long_and_the_last_words() -> None:
    sink = DeviceLog("d", max_lines=10)
    r, w = new_pipe()
    pipe = StderrPipe(r, 42, sink)
    assert pipe.read() is True  # nothing yet: EAGAIN, not a block
    os.write(w, b"one\ntw")
    assert pipe.read() is True
    assert [x["line"] for x in sink.tail(10)["lines"]] == ["one"]
    os.write(w, b"o\r\n" + b"x" * (MAX_LINE + 10) + b"\nlast words without an end")
    os.close(w)
    pipe.drain()  # what an exit does: read to the end, keep the partial line, close
    assert pipe.fd is None
    got = [x["line"] for x in sink.tail(10)["lines"]]
    assert got[:2] == ["one", "two"]
    assert got[2] == "x" * MAX_LINE + " [...]"
    assert got[3] == "last words without an end"
    assert sink.of_pid(42, 2) == got[2:]
    assert sink.of_pid(7, 2) == []


def test_tail_follow_cursor_and_dropped_lines() -> None:
    sink = DeviceLog("d", max_lines=5)
    for i in range(3):
        sink.add(1, f"l{i}")
    first = sink.tail(2)
    assert [x["line"] for x in first["lines"]] == ["l1", "l2"] and first["last_seq"] == 3
    assert sink.tail(0)["lines"] == [] and sink.tail(0)["last_seq"] == 3  # follow from now
    assert sink.tail(10, after=3) == {"device": "d", "lines": [], "last_seq": 3, "dropped": 0}
    for i in range(3, 12):  # 9 more; the buffer keeps l7..l11
        sink.add(2, f"l{i}")
    follow = sink.tail(100, after=3)
    assert [x["line"] for x in follow["lines"]] == ["l7", "l8", "l9", "l10", "l11"]
    assert follow["dropped"] == 4  # l3..l6 were written and pushed out before being read
    assert follow["last_seq"] == 12
    assert sink.tail(2, after=8)["lines"][0]["line"] == "l8"  # a page of the oldest new
    # a cursor from another manager's buffer (beyond ours): from the start
    assert sink.tail(1, after=999)["lines"][0]["seq"] == 8


def test_log_rate_is_bounded_per_device(caplog: pytest.LogCaptureFixture) -> None:
    sink = DeviceLog("spam", max_lines=BUFFER_LINES)
    with caplog.at_level(logging.WARNING, logger="devmgr.device"):
        for i in range(LOG_RATE + 50):
            sink.add(9, f"line {i}")
        sink.close(9)
    records = [r for r in caplog.records if r.name == "devmgr.device"]
    assert len(records) == LOG_RATE + 1
    assert "50 more stderr lines not logged" in records[-1].getMessage()
    assert len(sink.tail(BUFFER_LINES)["lines"]) == LOG_RATE + 50  # all kept for `logs`
