"""`requires`: validation with places, and start/stop order seen from outside (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import devmgr
from devmgr._config import parse_config, parse_device
from devmgr._errors import ConfigError, ControlError
from devmgr._spec import start_levels

from conftest import wait_until


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def streamer(ipc_dir: Path, name: str, requires: list[str] | None = None) -> dict[str, Any]:
    table: dict[str, Any] = {
        "kind": "streamer",
        "in": {"type": "PULL", "bind": [f"ipc://{ipc_dir}/{name}-in"]},
        "out": {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/{name}-out"]},
    }
    if requires is not None:
        table["requires"] = requires
    return table


def graph(ipc_dir: Path, edges: dict[str, list[str]]) -> dict[str, Any]:
    return {name: streamer(ipc_dir, name, reqs) for name, reqs in edges.items()}


def manager_config(ipc_dir: Path, devices: dict[str, Any]) -> dict[str, Any]:
    return {
        "manager": {
            "control": f"ipc://{ipc_dir}/control",
            "events": f"ipc://{ipc_dir}/events",
            "health_interval": 0.1,
            "stop_timeout": 2.0,
        },
        "devices": devices,
    }


def problems(ipc_dir: Path, edges: dict[str, list[str]]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        parse_config(manager_config(ipc_dir, graph(ipc_dir, edges)))
    return [(p.where, p.message) for p in caught.value.problems]


# ---------------------------------------------------------------- validation


def test_valid_requires_load(ipc_dir: Path) -> None:
    config = parse_config(
        manager_config(ipc_dir, graph(ipc_dir, {"broker": [], "a": ["broker"], "b": ["a"]}))
    )
    assert config.devices["b"].requires == ("a",)
    assert config.devices["broker"].requires == ()
    assert start_levels(config.devices) == [["broker"], ["a"], ["b"]]


def test_unknown_requirement_has_its_place(ipc_dir: Path) -> None:
    found = problems(ipc_dir, {"broker": [], "a": ["broker", "brokr"]})
    assert len(found) == 1
    where, message = found[0]
    assert where == "devices.a.requires[1]"
    assert "'brokr'" in message and "no device" in message and "did you mean broker?" in message


def test_self_requirement_has_its_place(ipc_dir: Path) -> None:
    assert problems(ipc_dir, {"a": ["a"]}) == [
        ("devices.a.requires[0]", "device 'a' requires itself")
    ]


def test_every_cycle_is_named_with_its_path(ipc_dir: Path) -> None:
    found = problems(
        ipc_dir,
        {
            "a": ["b"],
            "b": ["c"],
            "c": ["a"],
            "x": ["y"],
            "y": ["x"],
            "ok": ["a"],  # requires a cycle's member: not itself in a cycle
        },
    )
    assert found == [
        ("devices.a.requires[0]", "requirements form a cycle: a -> b -> c -> a"),
        ("devices.x.requires[0]", "requirements form a cycle: x -> y -> x"),
    ]


def test_two_cycles_through_one_device_are_both_named(ipc_dir: Path) -> None:
    found = problems(ipc_dir, {"a": ["b", "c"], "b": ["a"], "c": ["a"]})
    assert [m for _, m in found] == [
        "requirements form a cycle: a -> b -> a",
        "requirements form a cycle: a -> c -> a",
    ]
    assert [w for w, _ in found] == ["devices.a.requires[0]", "devices.a.requires[1]"]


def test_a_duplicate_requirement_is_refused(ipc_dir: Path) -> None:
    found = problems(ipc_dir, {"a": [], "b": ["a", "a"]})
    assert found == [
        ("devices.b.requires[1]", "'a' is listed twice (also at devices.b.requires[0])")
    ]


def test_a_requirement_must_be_a_device_name() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_device(
            {
                "name": "a",
                "kind": "streamer",
                "in": {"type": "PULL", "bind": ["tcp://127.0.0.1:5559"]},
                "out": {"type": "PUSH", "bind": ["tcp://127.0.0.1:5560"]},
                "requires": ["no spaces"],
            }
        )
    assert [p.where for p in caught.value.problems] == ["devices.a.requires[0]"]


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DEVMGR_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "devmgr", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def toml_graph(ipc_dir: Path, edges: dict[str, list[str]]) -> str:
    lines = [
        "[manager]",
        f'control = "ipc://{ipc_dir}/control"',
        f'events = "ipc://{ipc_dir}/events"',
    ]
    for name, reqs in edges.items():
        lines += [
            f"[devices.{name}]",
            'kind = "streamer"',
            f'in = {{ type = "PULL", bind = ["ipc://{ipc_dir}/{name}-in"] }}',
            f'out = {{ type = "PUSH", bind = ["ipc://{ipc_dir}/{name}-out"] }}',
            f"requires = {json.dumps(reqs)}",
        ]
    return "\n".join(lines) + "\n"


BAD_EDGES = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["nope"]}
BAD_PLACES = ["devices.d.requires[0]", "devices.a.requires[0]"]


def test_validate_and_start_refuse_bad_requires(ipc_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "devmgr.toml"
    path.write_text(toml_graph(ipc_dir, BAD_EDGES))
    for command in ("validate", "start"):
        done = run_cli(command, "-c", str(path))
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        out = done.stdout + done.stderr
        for place in BAD_PLACES:
            assert place in out, (command, out)
        assert "a -> b -> c -> a" in out
    path.write_text(toml_graph(ipc_dir, {"d": ["d"]}))
    for command in ("validate", "start"):
        done = run_cli(command, "-c", str(path))
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "devices.d.requires[0]: device 'd' requires itself" in done.stdout + done.stderr
    assert not (ipc_dir / "control").exists()  # start refused before binding anything


def test_add_and_reload_refuse_bad_requires(ipc_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "devmgr.toml"
    path.write_text(toml_graph(ipc_dir, {"a": []}))
    config = devmgr.load_config(path)
    with devmgr.Manager(config) as manager:
        for reqs, says in ((["ghost"], "no device"), (["b"], "requires itself")):
            with pytest.raises(ControlError) as caught:
                manager.add({**streamer(ipc_dir, "b", reqs), "name": "b"})
            assert caught.value.code == "invalid_spec"
            assert "devices.b.requires[0]" in caught.value.message and says in caught.value.message
        assert [d["name"] for d in manager.status()["devices"]] == ["a"]
        path.write_text(toml_graph(ipc_dir, {"a": ["c"], "c": ["a"]}))
        with pytest.raises(ControlError) as caught:
            manager.reload()
        assert "a -> c -> a" in caught.value.message
        assert "devices.a.requires[0]" in caught.value.message
        assert [d["name"] for d in manager.status()["devices"]] == ["a"]  # nothing changed
        # a good one is taken
        added = manager.add({**streamer(ipc_dir, "b", ["a"]), "name": "b"})
        assert added["state"] == "running"


# ---------------------------------------------------------------- order


class EventLog:
    """Every event the manager publishes, read from its events socket (from outside)."""

    def __init__(self, endpoint: str) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoint)
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stopping.is_set():
            if self.sub.poll(50):
                _topic, body = self.sub.recv_multipart()
                with self.lock:
                    self.events.append(json.loads(body))

    def topics(self, topic: str) -> list[str]:
        with self.lock:
            return [e["device"] for e in self.events if e["event"] == topic]

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.sub.close()
        self.ctx.term()


@pytest.fixture
def events(ipc_dir: Path) -> Iterator[EventLog]:
    # a manager's events endpoint is an ipc path: connect first, it binds later
    log = EventLog(f"ipc://{ipc_dir}/events")
    yield log
    log.close()


DIAMOND = {
    "db": [],
    "broker": ["db"],
    "left": ["broker"],
    "right": ["broker"],
    "top": ["left", "right"],
    "lone": [],
}


def assert_after(order: list[str], edges: dict[str, list[str]], *, reverse: bool = False) -> None:
    for name, reqs in edges.items():
        for req in reqs:
            first, second = (name, req) if reverse else (req, name)
            assert order.index(first) < order.index(second), (first, second, order)


class Recorder:
    """The manager's events as its on_event callback sees them (same stream as published)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, _topic: str, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)

    def topics(self, topic: str) -> list[str]:
        with self.lock:
            return [e["device"] for e in self.events if e["event"] == topic]


def spawn_order(events: list[dict[str, Any]], edges: dict[str, list[str]]) -> None:
    """Each device's first event comes after the device.running of each requirement."""
    seq = [(e["event"], e.get("device")) for e in events]
    for name, reqs in edges.items():
        first = min(i for i, (_t, d) in enumerate(seq) if d == name)
        for req in reqs:
            assert seq.index(("device.running", req)) < first, (name, req, seq)


def test_start_waits_for_requirements_and_stop_takes_dependents_first(
    ipc_dir: Path, events: EventLog
) -> None:
    config = parse_config(manager_config(ipc_dir, graph(ipc_dir, DIAMOND)))
    seen = Recorder()
    manager = devmgr.Manager(config)
    manager.on_event = seen
    manager.start()
    try:
        # the manager's own start: in dependency order
        assert sorted(seen.topics("device.running")) == sorted(DIAMOND)
        assert_after(seen.topics("device.running"), DIAMOND)
        with seen.lock:
            spawn_order(seen.events, DIAMOND)
        # from outside: the events socket, once it is subscribed (restart `lone` until
        # its device.running arrives there)
        wait_until(
            lambda: (manager.restart("lone"), "lone" in events.topics("device.running"))[1],
            timeout=10,
            what="the events subscription",
        )
        control = ["-e", f"ipc://{ipc_dir}/control"]
        stopped = len(events.topics("device.stopped"))
        done = run_cli("stop", "--all", *control)
        assert done.returncode == 0, done.stderr
        wait_until(
            lambda: len(events.topics("device.stopped")) == stopped + len(DIAMOND), what="stopped"
        )
        assert_after(events.topics("device.stopped")[stopped:], DIAMOND, reverse=True)
        running_before = len(events.topics("device.running"))
        mark = len(events.events)
        # names given dependents first: the order comes from `requires`, not from them
        done = run_cli("start", *reversed(list(DIAMOND)), *control)
        assert done.returncode == 0, done.stderr
        wait_until(
            lambda: len(events.topics("device.running")) == running_before + len(DIAMOND),
            what="all running again",
        )
        assert_after(events.topics("device.running")[running_before:], DIAMOND)
        with events.lock:
            restarted = [e for e in events.events[mark:] if "device" in e]
        spawn_order(restarted, DIAMOND)
    finally:
        stopped_before = len(events.topics("device.stopped"))
        manager.stop()
    # shutdown: dependents first too
    wait_until(
        lambda: len(events.topics("device.stopped")) == stopped_before + len(DIAMOND),
        what="all stopped at shutdown",
    )
    assert_after(events.topics("device.stopped")[stopped_before:], DIAMOND, reverse=True)


def test_devices_without_order_start_in_parallel(ipc_dir: Path) -> None:
    """Level by level: 3 levels of 4 devices; each level's starts overlap."""
    edges: dict[str, list[str]] = {}
    for level in range(3):
        for i in range(4):
            edges[f"l{level}d{i}"] = [f"l{level - 1}d{j}" for j in range(4)] if level else []
    config = parse_config(manager_config(ipc_dir, graph(ipc_dir, edges)))
    events = Recorder()
    manager = devmgr.Manager(config)
    manager.on_event = events
    with manager:
        assert len(events.topics("device.running")) == len(edges)
    with events.lock:
        seq = [(e["event"], e.get("device")) for e in events.events]
    running = events.topics("device.running")
    assert_after(running, edges)
    # parallel within a level: every device of a level is spawned before the first of
    # that level is running (a serial start would spawn one, wait for it, spawn the next)
    for level in range(3):
        names = [f"l{level}d{i}" for i in range(4)]
        first_running = min(seq.index(("device.running", n)) for n in names)
        for n in names:
            spawned = min(i for i, (t, d) in enumerate(seq) if d == n and t != "device.running")
            assert spawned < first_running, (n, seq)


def test_a_failed_requirement_holds_its_dependents_back(ipc_dir: Path) -> None:
    squatter_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    squatter = squatter_ctx.socket(zmq.PULL)
    squatter.setsockopt(zmq.LINGER, 0)
    squatter.bind(f"ipc://{ipc_dir}/base-in")  # base cannot bind: it fails to start
    try:
        devices = graph(ipc_dir, {"base": [], "dep": ["base"], "free": []})
        devices["base"]["restart"] = {"policy": "never"}
        config = parse_config(manager_config(ipc_dir, devices))
        events = Recorder()
        manager = devmgr.Manager(config)
        manager.on_event = events
        with manager:
            states = {d["name"]: d["state"] for d in manager.status()["devices"]}
            assert states["free"] == "running"
            assert states["dep"] == "stopped" and states["base"] != "running"
            with pytest.raises(ControlError) as caught:
                manager.start_device("dep")  # its requirement is not started here
            # it starts its requirement first, which fails again: dep is not started
            assert "dep not started: it requires base" in caught.value.message
            assert manager.status(["dep"])["devices"][0]["state"] == "stopped"
        assert "dep" not in events.topics("device.running")
    finally:
        squatter.close()
        squatter_ctx.term()


# ---------------------------------------------------------------- rolling restart


def lifecycle(events: Recorder, mark: int) -> list[tuple[str, str]]:
    with events.lock:
        return [
            (e["event"], e["device"])
            for e in events.events[mark:]
            if e["event"] in ("device.exited", "device.running")
        ]


def test_rolling_restart_one_at_a_time_in_dependency_order(ipc_dir: Path) -> None:
    edges = {"app": ["broker"], "broker": ["db"], "db": [], "lone": []}
    config = parse_config(manager_config(ipc_dir, graph(ipc_dir, edges)))
    events = Recorder()
    manager = devmgr.Manager(config)
    manager.on_event = events
    with manager:
        before = {d["name"]: d["pid"] for d in manager.status()["devices"]}
        with events.lock:
            mark = len(events.events)
        done = run_cli("restart", "--rolling", "--all", "-e", f"ipc://{ipc_dir}/control")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == len(edges)  # one progress line per device
        order = [line.split(":", 1)[0] for line in lines]
        assert all(": running (pid " in line for line in lines), lines
        assert_after(order, edges)
        # each device is running again before the next one goes down
        expected = [(t, n) for n in order for t in ("device.exited", "device.running")]
        assert lifecycle(events, mark) == expected
        after = {d["name"]: d["pid"] for d in manager.status()["devices"]}
        assert all(after[n] != before[n] for n in edges)
        # the Client form, by name
        with devmgr.Client(f"ipc://{ipc_dir}/control") as client:
            result = client.restart("app", "db", rolling=True)
        assert [d["name"] for d in result] == ["db", "app"]


def test_rolling_restart_stops_at_the_first_failure(ipc_dir: Path) -> None:
    edges = {"a": [], "x": ["a"], "z": ["x"]}
    devices = graph(ipc_dir, edges)
    devices["x"]["restart"] = {"policy": "never"}
    config = parse_config(manager_config(ipc_dir, devices))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    squatter = ctx.socket(zmq.PULL)
    squatter.setsockopt(zmq.LINGER, 0)
    try:
        with devmgr.Manager(config) as manager:
            before = {d["name"]: d["pid"] for d in manager.status()["devices"]}
            # take x's endpoint from under it: its restart cannot bind again
            (ipc_dir / "x-in").unlink()
            squatter.bind(f"ipc://{ipc_dir}/x-in")
            done = run_cli("restart", "--rolling", "--all", "-e", f"ipc://{ipc_dir}/control")
            assert done.returncode == 1, (done.stdout, done.stderr)
            assert "rolling restart stopped at x (restarted before it: a)" in done.stderr
            after = {d["name"]: d for d in manager.status()["devices"]}
            assert after["a"]["pid"] != before["a"] and after["a"]["state"] == "running"
            assert after["x"]["state"] != "running"
            assert after["z"]["pid"] == before["z"]  # never touched
    finally:
        squatter.close()
        ctx.term()
