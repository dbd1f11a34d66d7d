"""The control protocol (docs/protocol.md) over raw DEALER and REQ sockets, real manager."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from ctl_support import RawClient, make_config, manager_settings, streamer, write_config

import devmgr
from devmgr._config import load_config

from conftest import wait_until

DEVICE_FIELDS = {
    "name",
    "kind",
    "state",
    "pid",
    "uptime_s",
    "restarts",
    "last_exit",
    "cpu_percent",
    "rss_bytes",
    "num_fds",
    "msgs_in",
    "msgs_out",
    "bytes_in",
    "bytes_out",
    "stats",
    "endpoints",
}
STATS_KEYS = {
    f"{side}_{what}"
    for side in ("in", "out")
    for what in ("msgs_received", "bytes_received", "msgs_sent", "bytes_sent")
}
SOCKET_KINDS = pytest.mark.parametrize("kind", [zmq.DEALER, zmq.REQ], ids=["dealer", "req"])


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def manager(ipc_dir: Path) -> Iterator[devmgr.Manager]:
    """An embedded manager with one streamer `a`, started from a config file."""
    path = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    with devmgr.Manager(load_config(path)) as running:
        yield running


def endpoint(ipc_dir: Path) -> str:
    return f"ipc://{ipc_dir}/control"


def ok(reply: dict[str, Any], id: Any = 1) -> Any:
    assert reply.get("ok") is True, reply
    assert reply["v"] == 1
    assert reply["id"] == id
    assert set(reply) == {"v", "id", "ok", "result"}
    return reply["result"]


def error(reply: dict[str, Any], code: str, id: Any = None) -> str:
    assert reply.get("ok") is False, reply
    assert reply["v"] == 1
    assert reply["id"] == id
    assert set(reply) == {"v", "id", "ok", "error"}
    assert reply["error"]["code"] == code, reply
    message = reply["error"]["message"]
    assert isinstance(message, str) and message
    assert "Traceback" not in message
    return message


@SOCKET_KINDS
def test_every_command(kind: int, ipc_dir: Path, ctx: Any, manager: devmgr.Manager) -> None:
    client = RawClient(ctx, endpoint(ipc_dir), kind)
    try:
        assert ok(client.call("ping")) == "pong"
        assert ok(client.call("ping", {}, id="text id"), "text id") == "pong"
        nested = {"n": [1, 2, {"x": None}]}
        assert ok(client.call("ping", id=nested), nested) == "pong"
        assert ok(client.call("ping", id=None), None) == "pong"
        assert ok(client.call("version")) == {"version": devmgr.__version__, "protocol": 1}

        status = ok(client.call("status"))
        assert set(status) == {"manager", "devices"}
        info = status["manager"]
        assert info["pid"] == os.getpid()
        assert info["version"] == devmgr.__version__
        assert info["config"] == str(ipc_dir / "devmgr.toml")
        assert info["control"] == endpoint(ipc_dir)
        assert info["events"] == f"ipc://{ipc_dir}/events"
        assert info["uptime_s"] >= 0
        (dev,) = status["devices"]
        assert set(dev) >= DEVICE_FIELDS
        assert dev["name"] == "a" and dev["kind"] == "streamer" and dev["state"] == "running"
        assert psutil.pid_exists(dev["pid"])
        assert dev["last_exit"] is None and dev["restarts"] == 0
        assert set(dev["stats"]) == STATS_KEYS
        assert dev["endpoints"]["in"] == {"bind": [f"ipc://{ipc_dir}/a-in"], "connect": []}
        assert dev["endpoints"]["mon"] is None
        (named,) = ok(client.call("status", {"names": ["a"]}))["devices"]
        assert named["name"] == "a" and named["pid"] == dev["pid"]

        stats = ok(client.call("stats", {"name": "a"}))
        assert set(stats) == STATS_KEYS and all(isinstance(v, int) for v in stats.values())

        assert ok(client.call("pause", {"name": "a"}))["state"] == "paused"
        assert ok(client.call("resume", {"name": "a"}))["state"] == "running"

        (stopped,) = ok(client.call("stop", {"names": ["a"]}))
        assert stopped["state"] == "stopped" and stopped["pid"] is None
        assert stopped["last_exit"]["reason"] == "stopped"
        (started,) = ok(client.call("start", {"names": ["a"]}))
        assert started["state"] == "running"
        (restarted,) = ok(client.call("restart", {"names": ["*"]}))
        assert restarted["state"] == "running" and restarted["pid"] != started["pid"]
        assert restarted["restarts"] == 0  # manual restarts are not counted

        spec = {"name": "b", **streamer(ipc_dir, "b")}
        added = ok(client.call("add", {"spec": spec}))
        assert added["name"] == "b" and added["state"] == "running"
        names = [d["name"] for d in ok(client.call("status"))["devices"]]
        assert sorted(names) == ["a", "b"]
        assert ok(client.call("remove", {"name": "b"})) is None
        assert [d["name"] for d in ok(client.call("status"))["devices"]] == ["a"]

        # reload re-reads the file: add `c` to it, and `a` stays untouched
        write_config(
            ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a"), "c": streamer(ipc_dir, "c")}
        )
        diff = ok(client.call("reload"))
        assert diff == {
            "config": str(ipc_dir / "devmgr.toml"),
            "added": ["c"],
            "removed": [],
            "changed": [],
            "unchanged": ["a"],
        }
        states = {d["name"]: d["state"] for d in ok(client.call("status"))["devices"]}
        assert states == {"a": "running", "c": "running"}
        pids = [d["pid"] for d in ok(client.call("status"))["devices"]]

        assert ok(client.call("shutdown", id=99), 99) is None
        wait_until(lambda: not manager.running, what="the manager to stop after shutdown")
        wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), what="devices gone")
    finally:
        client.close()


@SOCKET_KINDS
def test_every_error_code(kind: int, ipc_dir: Path, ctx: Any, manager: devmgr.Manager) -> None:
    client = RawClient(ctx, endpoint(ipc_dir), kind)
    try:
        # bad_request: not JSON, not an object, missing or ill-typed fields, v != 1
        for raw in [b"not json", b"{", b"\xff\xfe", b"[1, 2]", b"42", b'"ping"', b"null"]:
            error(client.call_raw([raw]), "bad_request")
        error(client.call_raw([json.dumps({"v": 1, "id": 5}).encode()]), "bad_request", 5)
        for bad in [
            {"v": 1, "id": 6, "cmd": 5},
            {"v": 1, "id": 6, "cmd": None},
            {"v": 1, "id": 6, "cmd": "ping", "args": [1]},
            {"v": 1, "id": 6, "cmd": "ping", "args": "x"},
            {"id": 6, "cmd": "ping"},
            {"v": 2, "id": 6, "cmd": "ping"},
            {"v": "1", "id": 6, "cmd": "ping"},
            {"v": 1, "id": 6, "cmd": "ping", "extra": True},
            {"v": 1, "id": 6, "cmd": "pause"},
            {"v": 1, "id": 6, "cmd": "pause", "args": {"name": 5}},
            {"v": 1, "id": 6, "cmd": "pause", "args": {"name": "a", "more": 1}},
            {"v": 1, "id": 6, "cmd": "start", "args": {"names": "a"}},
            {"v": 1, "id": 6, "cmd": "start", "args": {"names": []}},
            {"v": 1, "id": 6, "cmd": "status", "args": {"names": [1]}},
            {"v": 1, "id": 6, "cmd": "add", "args": {"spec": "x"}},
            {"v": 1, "id": 6, "cmd": "add"},
        ]:
            error(client.call_raw([json.dumps(bad).encode()]), "bad_request", 6)
        ping = json.dumps({"v": 1, "id": 7, "cmd": "ping"}).encode()
        error(client.call_raw([ping, ping]), "bad_request")  # extra frames
        error(client.call_raw([ping, b""]), "bad_request")
        if kind == zmq.REQ:  # an empty request frame behind REQ's delimiter
            error(client.call_raw([b""]), "bad_request")

        # unknown_command
        message = error(client.call("frobnicate", id=8), "unknown_command", 8)
        assert "frobnicate" in message
        error(client.call("PING", id=8), "unknown_command", 8)

        # unknown_device, including status {names}
        for cmd in ("pause", "resume", "stats", "remove"):
            assert "nope" in error(client.call(cmd, {"name": "nope"}, id=9), "unknown_device", 9)
        for cmd in ("start", "stop", "restart", "status"):
            error(client.call(cmd, {"names": ["a", "nope"]}, id=9), "unknown_device", 9)

        # invalid_spec: the spec fails validation (every problem in the message)
        message = error(
            client.call("add", {"spec": {"name": "x", "kind": "bogus"}}, id=10),
            "invalid_spec",
            10,
        )
        assert "kind" in message
        bad_sockets = {"name": "x", "in": {"type": "NOPE"}, "out": {"type": "PUSH", "bind": 5}}
        message = error(client.call("add", {"spec": bad_sockets}, id=10), "invalid_spec", 10)
        assert "in.type" in message and "out.bind" in message
        error(client.call("add", {"spec": streamer(ipc_dir, "noname")}, id=10), "invalid_spec", 10)
        # nothing a client sends runs a program: unknown keys are refused, not executed
        sneaky = {"name": "x", **streamer(ipc_dir, "x"), "command": ["/bin/sh", "-c", "id"]}
        error(client.call("add", {"spec": sneaky}, id=10), "invalid_spec", 10)

        # too_large: over 1 MiB, whatever the content
        big = json.dumps({"v": 1, "id": 11, "cmd": "ping", "pad": "x" * (1 << 20)}).encode()
        error(client.call_raw([big]), "too_large")
        error(client.call_raw([b"\0" * ((1 << 20) + 1)]), "too_large")

        # after all that, a valid request is answered, and nothing was added
        assert ok(client.call("ping", id=12), 12) == "pong"
        assert [d["name"] for d in ok(client.call("status"))["devices"]] == ["a"]
    finally:
        client.close()


def test_conflicts(ipc_dir: Path, ctx: Any, manager: devmgr.Manager) -> None:
    client = RawClient(ctx, endpoint(ipc_dir))
    squatter = ctx.socket(zmq.PULL)
    squatter.setsockopt(zmq.LINGER, 0)
    try:
        # a device of that name exists already
        spec = {"name": "a", **streamer(ipc_dir, "a2")}
        assert "a" in error(client.call("add", {"spec": spec}), "conflict", 1)
        # an endpoint another device of this manager binds
        taken = {"name": "b", **streamer(ipc_dir, "b")}
        taken["in"] = {"type": "PULL", "bind": [f"ipc://{ipc_dir}/a-in"]}
        assert "a-in" in error(client.call("add", {"spec": taken}), "conflict", 1)
        # an endpoint a foreign socket binds: the first start fails, with the OS error
        port = squatter.bind_to_random_port("tcp://127.0.0.1")
        foreign = {"name": "c", **streamer(ipc_dir, "c")}
        foreign["in"] = {"type": "PULL", "bind": [f"tcp://127.0.0.1:{port}"]}
        message = error(client.call("add", {"spec": foreign}, timeout=10), "conflict", 1)
        assert str(port) in message and "in use" in message.lower()
        # none of them was kept
        assert [d["name"] for d in ok(client.call("status"))["devices"]] == ["a"]
    finally:
        squatter.close()
        client.close()


def test_envelopes_are_mirrored(ipc_dir: Path, ctx: Any, manager: devmgr.Manager) -> None:
    dealer = RawClient(ctx, endpoint(ipc_dir))
    try:
        ping = json.dumps({"v": 1, "id": "d", "cmd": "ping"}).encode()
        # a DEALER that adds the delimiter itself gets it back, like a REQ does
        dealer.send_frames([b"", ping])
        reply = dealer.recv_frames()
        assert reply[0] == b"" and len(reply) == 2
        assert json.loads(reply[1])["result"] == "pong"
        # empty frames: no request in them, but there is an envelope to answer to
        for frames in ([b""], [b"", b""], [b"", b"", b""]):
            dealer.send_frames(frames)
            reply = dealer.recv_frames()
            assert json.loads(reply[-1])["error"]["code"] == "bad_request"
    finally:
        dealer.close()


def test_many_clients_at_once(ipc_dir: Path, ctx: Any, manager: devmgr.Manager) -> None:
    clients = [RawClient(ctx, endpoint(ipc_dir), zmq.DEALER) for _ in range(30)]
    try:
        for round_ in range(10):
            for i, client in enumerate(clients):
                client.send_frames(
                    [json.dumps({"v": 1, "id": [i, round_], "cmd": "status"}).encode()]
                )
            for i, client in enumerate(clients):
                reply = json.loads(client.recv_frames()[0])
                assert reply["id"] == [i, round_] and reply["ok"]
    finally:
        for client in clients:
            client.close()

    failures: list[BaseException] = []

    def hammer() -> None:
        try:
            with devmgr.Client(endpoint(ipc_dir), timeout=10) as client:
                for _ in range(50):
                    assert client.status("a")["devices"][0]["name"] == "a"
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures


def test_slow_restart_does_not_block_others(ipc_dir: Path, ctx: Any) -> None:
    """A device that cannot stop (SIGSTOPped) makes restart take stop_timeout; meanwhile
    another client's ping and status are answered at once."""
    config = make_config(ipc_dir, {"a": streamer(ipc_dir, "a")}, stop_timeout=1.5)
    with devmgr.Manager(config) as manager:
        pid = manager.status(["a"])["devices"][0]["pid"]
        slow, other = RawClient(ctx, endpoint(ipc_dir)), RawClient(ctx, endpoint(ipc_dir))
        try:
            os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            slow.send_frames([b'{"v": 1, "id": "r", "cmd": "restart", "args": {"names": ["a"]}}'])
            wait_until(
                lambda: manager.status(["a"])["devices"][0]["state"] == "stopping",
                what="the restart to begin",
            )
            for i in range(5):
                t0 = time.monotonic()
                assert ok(other.call("ping", id=i), i) == "pong"
                assert other.call("status", id=i)["ok"]
                assert time.monotonic() - t0 < 0.5
            assert time.monotonic() - started < 1.5, "answered only after the restart"
            reply = json.loads(slow.recv_frames(timeout=10)[0])
            (dev,) = ok(reply, "r")
            assert dev["state"] == "running" and dev["pid"] != pid
            assert time.monotonic() - started >= 1.4  # it did wait for the SIGKILL
        finally:
            slow.close()
            other.close()
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGCONT)


def test_restart_during_restart_waits_its_turn(ipc_dir: Path, ctx: Any) -> None:
    """Commands on one device run in order: both restarts succeed, no 'busy' errors."""
    with devmgr.Manager(make_config(ipc_dir, {"a": streamer(ipc_dir, "a")})) as manager:
        pid = manager.status(["a"])["devices"][0]["pid"]
        first, second = RawClient(ctx, endpoint(ipc_dir)), RawClient(ctx, endpoint(ipc_dir))
        try:
            first.send_frames([b'{"v": 1, "id": 1, "cmd": "restart", "args": {"names": ["a"]}}'])
            second.send_frames([b'{"v": 1, "id": 2, "cmd": "restart", "args": {"names": ["a"]}}'])
            r1 = json.loads(first.recv_frames(timeout=10)[0])
            r2 = json.loads(second.recv_frames(timeout=10)[0])
            (d1,), (d2,) = ok(r1, 1), ok(r2, 2)
            assert d1["state"] == "running" == d2["state"]
            assert len({pid, d1["pid"], d2["pid"]}) == 3
        finally:
            first.close()
            second.close()


def test_vanished_client_and_next_request(ipc_dir: Path, ctx: Any, manager: devmgr.Manager) -> None:
    """A client that leaves before its (slow) reply costs nothing; the next one is answered."""
    gone = RawClient(ctx, endpoint(ipc_dir))
    gone.send_frames([b'{"v": 1, "id": 1, "cmd": "restart", "args": {"names": ["a"]}}'])
    gone.close()
    client = RawClient(ctx, endpoint(ipc_dir))
    try:
        wait_until(
            lambda: ok(client.call("status"))["devices"][0]["state"] == "running",
            what="the restart to finish",
        )
        assert ok(client.call("ping")) == "pong"
    finally:
        client.close()


def test_settings_of_embedded_default_runtime_dir(ipc_dir: Path) -> None:
    """The default control endpoint lives in a 0700 runtime dir, the socket file is 0600."""
    from devmgr._config import parse_config

    settings = manager_settings(ipc_dir)
    del settings["control"], settings["events"]
    config = parse_config({"manager": settings, "devices": {}})
    with devmgr.Manager(config):
        folder = ipc_dir / "devmgr"
        assert folder.stat().st_mode & 0o777 == 0o700
        assert (folder / "control").stat().st_mode & 0o777 == 0o600
        with devmgr.Client(timeout=5) as client:  # found through $XDG_RUNTIME_DIR
            assert client.ping() == "pong"
