"""`devmgr bench` end to end, and the C load generator it drives (devmgr._loadgen)."""

from __future__ import annotations

import array
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from devmgr import _latency, _loadgen
from devmgr._bench import CONTENDERS


class Sockets:
    """Make sockets (linger 0) in one context; close them all and end the context after."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.made: list[zmq.Socket[Any]] = []

    def __call__(self, kind: int) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.ctx.socket(kind)
        sock.linger = 0
        self.made.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.made:
            sock.close()
        self.ctx.term()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    """A socket factory whose sockets and context are closed after the test."""
    factory = Sockets()
    try:
        yield factory
    finally:
        factory.close()


def _pair(sockets: Sockets, ipc_dir: Path) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    push = sockets(zmq.PUSH)
    pull = sockets(zmq.PULL)
    pull.bind(f"ipc://{ipc_dir}/pipe")
    push.connect(f"ipc://{ipc_dir}/pipe")
    return push, pull


def _in_thread(func: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", func(*args)))
    thread.start()
    return thread, out


def test_send_and_sink_count_messages_and_bytes(sockets: Sockets, ipc_dir: Path) -> None:
    push, pull = _pair(sockets, ipc_dir)
    # more than the HWMs hold, so the sender must wait at its HWM and go on
    count, size = 20_000, 100
    thread, out = _in_thread(_loadgen.sink, pull, count, 10.0)
    sent, send_first, send_last = _loadgen.send(push, count, size, 10.0)
    thread.join(15.0)
    assert not thread.is_alive()
    received, nbytes, first, last = out["result"]
    assert sent == count
    assert send_first <= send_last
    assert (received, nbytes) == (count, count * size)
    assert 0 < first <= last <= _loadgen.monotonic_ns()


def test_sent_messages_have_the_size_asked_for(sockets: Sockets, ipc_dir: Path) -> None:
    push, pull = _pair(sockets, ipc_dir)
    for size in (0, 1, 64, 4096):
        assert _loadgen.send(push, 3, size, 5.0)[0] == 3
        for _ in range(3):
            assert pull.poll(5000)
            assert len(pull.recv()) == size


def test_sink_counts_a_multipart_message_once(sockets: Sockets, ipc_dir: Path) -> None:
    push, pull = _pair(sockets, ipc_dir)
    for _ in range(10):
        push.send_multipart([b"in", b"abc", b"de"])
    received, nbytes, _, _ = _loadgen.sink(pull, 10, 5.0)
    assert (received, nbytes) == (10, 70)


def test_sink_returns_short_after_its_idle_timeout(sockets: Sockets, ipc_dir: Path) -> None:
    push, pull = _pair(sockets, ipc_dir)
    push.send(b"only one")
    start = _loadgen.monotonic_ns()
    received, nbytes, _, _ = _loadgen.sink(pull, 5, 0.2)
    waited = (_loadgen.monotonic_ns() - start) / 1e9
    assert (received, nbytes) == (1, 8)
    assert 0.15 < waited < 3.0


def test_send_gives_up_when_nobody_takes_messages(sockets: Sockets, ipc_dir: Path) -> None:
    push = sockets(zmq.PUSH)
    # bound with no peer: a PUSH has no pipe to queue on (a connect would queue to HWM)
    push.bind(f"ipc://{ipc_dir}/nobody")
    sent, _, _ = _loadgen.send(push, 10, 8, 0.2)
    assert sent == 0


def test_drain_stops_when_told_or_at_its_count(sockets: Sockets, ipc_dir: Path) -> None:
    push, pull = _pair(sockets, ipc_dir)
    stop_rx = sockets(zmq.PAIR)
    stop_tx = sockets(zmq.PAIR)
    stop_rx.bind("inproc://stop")
    stop_tx.connect("inproc://stop")

    for _ in range(5):
        push.send_multipart([b"out", b"x" * 10])
    assert _loadgen.drain(pull, stop_rx, 3, 5.0)[:2] == (3, 39)

    thread, out = _in_thread(_loadgen.drain, pull, stop_rx, 0, 30.0)
    stop_tx.send(b"")
    thread.join(10.0)
    assert not thread.is_alive(), "drain did not notice the stop socket"
    assert out["result"][:2] == (2, 26)


def _run_bench(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devmgr", "bench", "--repeat", "1", "--json", *extra],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def _check_report(proc: subprocess.CompletedProcess[str], contenders: list[str]) -> None:
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["setup"]["contenders"] == contenders
    for block in report["results"]:
        assert set(block["contenders"]) == set(contenders)
        for name, row in block["contenders"].items():
            assert row["errors"] == [], (name, row["errors"])
            assert row["median"] > 0, name
            assert row["min"] <= row["median"] <= row["max"], name
            assert row["ratio_to_zmq_proxy"] > 0, name


def test_bench_reports_every_contender_over_ipc() -> None:
    proc = _run_bench("--count", "3000", "--size", "64", "1024")
    _check_report(proc, list(CONTENDERS))


def test_bench_over_tcp() -> None:
    proc = _run_bench("--count", "3000", "--size", "64", "--transport", "tcp")
    _check_report(proc, list(CONTENDERS))


def test_bench_rejects_an_unknown_contender() -> None:
    proc = _run_bench("--count", "3000", "--contenders", "zmq_proxy,nginx")
    assert proc.returncode == 2
    assert "nginx" in proc.stderr


# --- `devmgr bench --latency` and its C loops ------------------------------------------


def test_echo_returns_requests_frame_for_frame_and_drops_the_stream(ipc_dir: Path) -> None:
    ctx = zmq.Context.instance()
    worker, client = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    stop_tx, stop_rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for sock in (worker, client, stop_tx, stop_rx):
        sock.linger = 0
    worker.bind(f"ipc://{ipc_dir}/echo")
    client.connect(f"ipc://{ipc_dir}/echo")
    stop_rx.bind("inproc://echo-stop")
    stop_tx.connect("inproc://echo-stop")
    thread, out = _in_thread(_loadgen.echo, worker, stop_rx, 0x61, 30.0)
    client.send_multipart([b"id", b"", b"aaa"])  # the opposite stream: dropped
    client.send_multipart([b"id", b"", b"R-1"])
    client.send(b"")  # an empty last frame is echoed, not dropped
    client.send_multipart([b"x"] * 20 + [b"R"])  # more frames than the loop keeps: dropped
    client.send(b"R-2")
    assert client.poll(5000)
    assert client.recv_multipart() == [b"id", b"", b"R-1"]
    assert client.recv_multipart() == [b""]
    assert client.recv_multipart() == [b"R-2"]
    stop_tx.send(b"")
    thread.join(10.0)
    assert not thread.is_alive(), "echo did not notice the stop socket"
    assert out["result"] == (3, 2)
    for sock in (worker, client, stop_tx, stop_rx):
        sock.close()


def test_ping_times_each_round_trip_and_stops_at_a_wrong_reply(ipc_dir: Path) -> None:
    ctx = zmq.Context.instance()
    worker, client = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for sock in (worker, client):
        sock.linger = 0
    worker.bind(f"ipc://{ipc_dir}/ping")
    client.connect(f"ipc://{ipc_dir}/ping")
    seen: list[bytes] = []

    def serve() -> None:
        for n in range(4):
            assert worker.poll(10_000)
            request = worker.recv()
            seen.append(request)
            worker.send(request if n < 3 else b"not the request")

    thread = threading.Thread(target=serve)
    thread.start()
    # 1 ms slots: 3 good replies, then a wrong one ends the run
    raw = _loadgen.ping(client, 10, 8, 1_000_000, 5.0)
    thread.join(10.0)
    rtts = array.array("q")
    rtts.frombytes(raw)
    assert len(rtts) == 3
    assert all(0 < rtt < 5e9 for rtt in rtts)
    assert seen == [b"R" + b"r" * 7] * 4
    for sock in (worker, client):
        sock.close()


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 1001))
    assert _latency.percentile(values, 0.5) == 500
    assert _latency.percentile(values, 0.99) == 990
    assert _latency.percentile(values, 0.999) == 999
    assert _latency.percentile([7], 0.999) == 7


def test_bench_latency_reports_every_contender_with_and_without_the_stream() -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "devmgr", "bench", "--latency", "--json", "--repeat", "1",
            "--requests", "200", "--rate", "2000", "--opposite-stream", "20000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["setup"]["contenders"] == list(_latency.CONTENDERS)
    assert [(b["transport"], b["opposite_stream"]) for b in report["results"]] == [
        ("ipc", 0),
        ("ipc", 20000),
    ]
    for block in report["results"]:
        expected = set(_latency.CONTENDERS) - ({"no_device"} if block["opposite_stream"] else set())
        assert set(block["contenders"]) == expected
        for name, row in block["contenders"].items():
            assert row["errors"] == [], (name, row["errors"])
            assert row["requests"] == 200, name
            assert 0 < row["p50_us"] <= row["p99_us"] <= row["p99.9_us"], name
            assert row[f"p50_ratio_to_{_latency.BASELINE}"] > 0, name


def test_bench_latency_rejects_an_unknown_contender() -> None:
    proc = _run_bench("--latency", "--contenders", "devmgr,haproxy")
    assert proc.returncode == 2
    assert "haproxy" in proc.stderr
