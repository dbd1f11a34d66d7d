"""Prometheus metrics and health endpoints, scraped over real HTTP and parsed."""

from __future__ import annotations

import copy
import gzip
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from devmgr._errors import DevmgrError
from devmgr._metrics import EXIT_REASONS, STATES, MetricsServer, parse_address

from conftest import wait_until

STAT_KEYS = [
    f"{side}_{what}_{way}"
    for side in ("in", "out")
    for way in ("received", "sent")
    for what in ("msgs", "bytes")
]


def _device(name: str, state: str = "running", **extra: Any) -> dict[str, Any]:
    running = state in ("running", "paused")
    stats = {key: 0 for key in STAT_KEYS}
    dev: dict[str, Any] = {
        "name": name,
        "kind": "monitored_queue",
        "state": state,
        "pid": 4242 if running else None,
        "uptime_s": 12.5 if running else None,
        "restarts": 0,
        "last_exit": None,
        "cpu_percent": 150.0 if running else None,
        "rss_bytes": 20_000_000 if running else None,
        "num_fds": 17 if running else None,
        "msgs_in": 0,
        "msgs_out": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "stats": stats,
        "endpoints": {"in": {"bind": ["tcp://127.0.0.1:5559"], "connect": []}},
        "autostart": True,
        "message": None,
    }
    dev.update(extra)
    return dev


def _status(*devices: dict[str, Any], alive: bool = True) -> dict[str, Any]:
    return {
        "alive": alive,
        "manager": {
            "pid": 100,
            "uptime_s": 99.5,
            "version": "9.8.7",
            "config": None,
            "control": "ipc:///tmp/x/control",
            "events": "ipc:///tmp/x/events",
        },
        "devices": list(devices),
    }


class Source:
    """A status that a test changes between scrapes; counts the calls to collect()."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.status: Mapping[str, Any] = status
        self.calls = 0
        self.error: Exception | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Mapping[str, Any]:
        with self._lock:
            self.calls += 1
        if self.error is not None:
            raise self.error
        return copy.deepcopy(self.status)


@pytest.fixture
def serve() -> Iterator[Callable[[Source], str]]:
    """Start a MetricsServer on a free port for a Source; yields a function returning its URL."""
    servers: list[MetricsServer] = []

    def start(source: Source, address: str = "127.0.0.1:0") -> str:
        server = MetricsServer(address, source)
        server.start()
        servers.append(server)
        host, port = server.server_address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    yield start
    for server in servers:
        server.stop()


def _get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read(), reply.headers
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape /metrics; return {(sample name, sorted labels): value}."""
    code, body, headers = _get(url + "/metrics")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def value(samples: Mapping[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# ---- exposition -----------------------------------------------------------------------------


def test_exposition_of_a_hand_built_status(serve: Callable[[Source], str]) -> None:
    stats = dict(zip(STAT_KEYS, range(1, 9), strict=True))
    busy = _device(
        "orders",
        restarts=3,
        stats=stats,
        last_exit={"code": None, "signal": 9, "reason": "killed", "at": 1_700_000_000.25},
    )
    down = _device("quotes", "backoff", kind="queue", restarts=1)
    url = serve(Source(_status(busy, down)))
    s = scrape(url)

    assert value(s, "devmgr_manager_alive") == 1
    assert value(s, "devmgr_manager_ready") == 0  # quotes is backing off
    assert value(s, "devmgr_build_info", version="9.8.7") == 1
    assert value(s, "devmgr_manager_uptime_seconds") == 99.5
    for state in STATES:
        expected = {"running": 1, "backoff": 1}.get(state, 0)
        assert value(s, "devmgr_devices", state=state) == expected, state
    # the state set: one 1 per device, every other state 0
    for state in STATES:
        assert value(s, "devmgr_device_state", device="orders", state=state) == (state == "running")
        assert value(s, "devmgr_device_state", device="quotes", state=state) == (state == "backoff")
    assert value(s, "devmgr_device_up", device="orders") == 1
    assert value(s, "devmgr_device_up", device="quotes") == 0
    info = value(s, "devmgr_device_info", device="quotes", kind="queue", autostart="true")
    assert info == 1
    assert value(s, "devmgr_device_restarts_total", device="orders") == 3
    assert value(s, "devmgr_device_restarts_total", device="quotes") == 1
    last = {"device": "orders", "reason": "killed", "code": "", "signal": "9"}
    assert value(s, "devmgr_device_last_exit_info", **last) == 1
    assert value(s, "devmgr_device_last_exit_timestamp_seconds", device="orders") == (
        1_700_000_000.25
    )
    assert value(s, "devmgr_device_last_exit_timestamp_seconds", device="quotes") is None
    # the 8 STATISTICS counters: messages and bytes per socket and direction
    for key, number in stats.items():
        sock, what, direction = key.split("_")
        name = "devmgr_device_messages_total" if what == "msgs" else "devmgr_device_bytes_total"
        got = value(s, name, device="orders", socket=sock, direction=direction)
        assert got == number, key
    assert value(s, "devmgr_device_cpu_usage_ratio", device="orders") == 1.5
    assert value(s, "devmgr_device_resident_memory_bytes", device="orders") == 20_000_000
    assert value(s, "devmgr_device_open_fds", device="orders") == 17
    assert value(s, "devmgr_device_uptime_seconds", device="orders") == 12.5
    # no process: no process figures (absent, not zero)
    for name in ("cpu_usage_ratio", "resident_memory_bytes", "open_fds", "uptime_seconds"):
        assert value(s, f"devmgr_device_{name}", device="quotes") is None
    # the manager's own process figures come from prometheus-client's process collector
    assert value(s, "process_resident_memory_bytes") is not None


def test_names_follow_prometheus_conventions(serve: Callable[[Source], str]) -> None:
    dev = _device(
        "a",
        exits=dict.fromkeys(EXIT_REASONS, 1),
        last_exit={"code": 1, "signal": None, "reason": "exited", "at": 1.0},
    )
    url = serve(Source(_status(dev)))
    code, body, _ = _get(url + "/metrics")
    assert code == 200
    families = list(text_string_to_metric_families(body.decode()))
    ours = [f for f in families if f.name.startswith("devmgr_")]
    assert len(ours) >= 15
    for family in families:
        assert family.name.startswith(("devmgr_", "process_")), family.name
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", family.name), family.name
        assert family.documentation, family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
            for label in sample.labels:
                assert re.fullmatch(r"[a-z_][a-z0-9_]*", label), label
    # base units only: no milliseconds, kilobytes or percent
    names = {f.name for f in families}
    assert not [n for n in names if re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", n)]
    # The same exposition in OpenMetrics, which checks types and names more strictly.
    code, body, headers = _get(url + "/metrics", {"Accept": "application/openmetrics-text"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    om = {f.name: f for f in openmetrics_families(body.decode())}
    assert om["devmgr_device_messages"].type == "counter"
    assert om["devmgr_build"].type == "info"
    exits = {
        s.labels["reason"]: s.value
        for s in om["devmgr_device_exits"].samples
        if s.name.endswith("_total")
    }
    assert exits == dict.fromkeys(EXIT_REASONS, 1)


def test_counters_move_between_scrapes(serve: Callable[[Source], str]) -> None:
    dev = _device("a")
    source = Source(_status(dev))
    url = serve(source)
    assert source.calls == 0  # nothing is polled before a scrape
    first = scrape(url)
    assert source.calls == 1  # one collect() per scrape
    dev["stats"]["in_msgs_received"] = 1000
    dev["stats"]["in_bytes_received"] = 64_000
    dev["restarts"] = 2
    source.status = _status(dev)
    second = scrape(url)
    assert source.calls == 2
    labels = {"device": "a", "socket": "in", "direction": "received"}
    assert value(first, "devmgr_device_messages_total", **labels) == 0
    assert value(second, "devmgr_device_messages_total", **labels) == 1000
    assert value(second, "devmgr_device_bytes_total", **labels) == 64_000
    assert value(second, "devmgr_device_restarts_total", device="a") == 2


def test_a_removed_device_disappears(serve: Callable[[Source], str]) -> None:
    source = Source(_status(_device("a"), _device("b")))
    url = serve(source)
    assert value(scrape(url), "devmgr_device_up", device="b") == 1
    source.status = _status(_device("a"))
    assert not [k for k in scrape(url) if ("device", "b") in k[1]]


def test_gzip_when_asked(serve: Callable[[Source], str]) -> None:
    url = serve(Source(_status(_device("a"))))
    code, body, headers = _get(url + "/metrics", {"Accept-Encoding": "gzip"})
    assert code == 200
    assert headers["Content-Encoding"] == "gzip"
    assert b"devmgr_device_up" in gzip.decompress(body)


# ---- health -----------------------------------------------------------------------------------


def test_healthz_follows_alive(serve: Callable[[Source], str]) -> None:
    source = Source(_status(_device("a")))
    url = serve(source)
    assert _get(url + "/healthz")[:2] == (200, b"ok\n")
    source.status = _status(_device("a"), alive=False)
    code, body, _ = _get(url + "/healthz")
    assert (code, body) == (503, b"manager loop not alive\n")
    assert value(scrape(url), "devmgr_manager_alive") == 0


def test_collect_failure_is_unhealthy_not_an_error_page(serve: Callable[[Source], str]) -> None:
    source = Source(_status(_device("a")))
    source.error = TimeoutError("the loop did not answer")
    url = serve(source)
    assert _get(url + "/healthz")[0] == 503
    assert _get(url + "/readyz")[0] == 503
    samples = scrape(url)  # still a valid exposition, saying the manager is not alive
    assert value(samples, "devmgr_manager_alive") == 0
    assert value(samples, "devmgr_manager_ready") == 0
    assert not [k for k in samples if k[0].startswith("devmgr_device_")]


@pytest.mark.parametrize(
    ("devices", "ready"),
    [
        ([("a", "running", True), ("b", "running", True)], True),
        ([("a", "running", True), ("b", "paused", True)], True),  # paused on purpose
        ([("a", "running", True), ("b", "stopped", False)], True),  # not autostart
        ([("a", "running", True), ("b", "starting", True)], False),
        ([("a", "running", True), ("b", "backoff", True)], False),
        ([("a", "fatal", True)], False),
        ([], True),
    ],
)
def test_readyz(
    serve: Callable[[Source], str], devices: list[tuple[str, str, bool]], ready: bool
) -> None:
    status = _status(*[_device(n, s, autostart=auto) for n, s, auto in devices])
    url = serve(Source(status))
    code, body, _ = _get(url + "/readyz")
    if ready:
        assert (code, body) == (200, b"ready\n")
    else:
        assert code == 503
        assert body.startswith(b"not ready: ")
        bad = [n for n, s, auto in devices if auto and s not in ("running", "paused")]
        assert body.decode().count(" is ") == len(bad)
        for name in bad:
            assert f"{name} is " in body.decode()
    assert value(scrape(url), "devmgr_manager_ready") == ready


def test_readyz_needs_a_live_loop(serve: Callable[[Source], str]) -> None:
    url = serve(Source(_status(_device("a"), alive=False)))
    assert _get(url + "/readyz")[:2] == (503, b"not ready: manager loop not alive\n")


def test_other_paths_and_methods(serve: Callable[[Source], str]) -> None:
    url = serve(Source(_status()))
    assert _get(url + "/nope")[0] == 404
    assert _get(url + "/")[0] == 200
    request = urllib.request.Request(url + "/healthz", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 405
    info.value.close()
    head = urllib.request.Request(url + "/healthz", method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as reply:
        assert reply.status == 200
        assert reply.read() == b""


# ---- the server -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_address_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(f"127.0.0.1:{port}", Source(_status()))
        with pytest.raises(DevmgrError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            server.start()


def test_stop_frees_the_port() -> None:
    port = _free_port()
    source = Source(_status(_device("a")))
    for _ in range(2):  # the second start binds the very port the first one let go
        with MetricsServer(f"127.0.0.1:{port}", source) as server:
            assert server.server_address == ("127.0.0.1", port)
            assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_ipv6_loopback(serve: Callable[..., str]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    url = serve(Source(_status(_device("a"))), "[::1]:0")
    assert url.startswith("http://[::1]:")
    assert _get(url + "/healthz")[0] == 200


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:9700", ("127.0.0.1", 9700)),
        ("[::1]:1", ("::1", 1)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_parse_address(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["9700", ":9700", "host:", "host:port", "h:70000"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(address)


def test_slow_collect_does_not_block_other_requests(serve: Callable[[Source], str]) -> None:
    # One thread per request: a scrape stuck in collect() leaves /healthz of others free.
    gate = threading.Event()
    entered = threading.Event()
    status = _status(_device("a"))
    calls: list[int] = []

    def collect() -> Mapping[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            gate.wait(10)
        return status

    server = MetricsServer("127.0.0.1:0", collect)
    server.start()
    try:
        host, port = server.server_address
        results: list[int] = []
        slow = threading.Thread(
            target=lambda: results.append(_get(f"http://{host}:{port}/metrics")[0])
        )
        slow.start()
        assert entered.wait(5)
        assert _get(f"http://{host}:{port}/healthz")[0] == 200
        gate.set()
        slow.join(10)
        assert results == [200]
    finally:
        gate.set()
        server.stop()


# ---- a real manager -----------------------------------------------------------------------------


def test_real_manager_counters_move_with_traffic_and_restarts(ipc_dir: Path) -> None:
    import os
    import signal

    import zmq

    from devmgr import Manager
    from devmgr._config import parse_config

    port = _free_port()
    config = parse_config(
        {
            "manager": {
                "control": f"ipc://{ipc_dir}/control",
                "metrics": f"127.0.0.1:{port}",
                "health_interval": 0.1,
                "stop_timeout": 2.0,
            },
            "devices": {
                "pipe": {
                    "kind": "streamer",
                    "in": {"type": "PULL", "bind": [f"ipc://{ipc_dir}/in"]},
                    "out": {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/out"]},
                    "restart": {"backoff_initial": 0.05},
                }
            },
        }
    )
    url = f"http://127.0.0.1:{port}"
    ctx = zmq.Context()
    manager = Manager(config)
    try:
        manager.start()
        assert _get(url + "/healthz")[0] == 200
        assert _get(url + "/readyz")[0] == 200
        s = scrape(url)
        assert value(s, "devmgr_device_up", device="pipe") == 1
        assert value(s, "devmgr_device_restarts_total", device="pipe") == 0

        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        for sock in (push, pull):
            sock.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 2000)
        pull.setsockopt(zmq.RCVTIMEO, 2000)
        push.connect(f"ipc://{ipc_dir}/in")
        pull.connect(f"ipc://{ipc_dir}/out")
        for i in range(100):
            push.send(b"x" * 10 + bytes([i]))
        for _ in range(100):
            pull.recv()

        def counted() -> dict[Any, float]:
            samples = scrape(url)
            got = value(
                samples,
                "devmgr_device_messages_total",
                device="pipe",
                socket="in",
                direction="received",
            )
            assert got == 100, got
            return samples

        s = wait_until(counted, 10.0, what="100 messages in the exposition")
        labels = {"device": "pipe", "socket": "out", "direction": "sent"}
        assert value(s, "devmgr_device_messages_total", **labels) == 100
        assert value(s, "devmgr_device_bytes_total", **labels) == 1100
        assert (value(s, "devmgr_device_resident_memory_bytes", device="pipe") or 0) > 0

        pid = manager.status()["devices"][0]["pid"]
        os.kill(pid, signal.SIGKILL)

        def restarted() -> dict[Any, float]:
            samples = scrape(url)
            assert value(samples, "devmgr_device_restarts_total", device="pipe") == 1
            assert value(samples, "devmgr_device_up", device="pipe") == 1
            return samples

        s = wait_until(restarted, 10.0, what="a restart in the exposition")
        last = {
            "device": "pipe",
            "reason": "killed",
            "code": "",
            "signal": str(int(signal.SIGKILL)),
        }
        assert value(s, "devmgr_device_last_exit_info", **last) == 1
        push.close()
        pull.close()
    finally:
        manager.stop()
        ctx.destroy(linger=0)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/healthz", timeout=2)
