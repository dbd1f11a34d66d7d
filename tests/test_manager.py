"""The manager with real device children: readiness, restarts, health, reload, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

import devmgr
from devmgr._config import parse_config

from conftest import process_gone, wait_until


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def streamer(ipc_dir: Path, name: str, **extra: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "kind": "streamer",
        "in": {"type": "PULL", "bind": [f"ipc://{ipc_dir}/{name}-in"]},
        "out": {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/{name}-out"]},
    }
    table.update(extra)
    return table


def make_config(ipc_dir: Path, devices: dict[str, Any], **manager: Any) -> devmgr.ManagerConfig:
    settings = {
        "control": f"ipc://{ipc_dir}/control",
        "events": f"ipc://{ipc_dir}/events",
        "health_interval": 0.1,
        "stop_timeout": 2.0,
        **manager,
    }
    return parse_config({"manager": settings, "devices": devices})


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def device(manager: devmgr.Manager, name: str) -> dict[str, Any]:
    (entry,) = manager.status([name])["devices"]
    return entry  # type: ignore[no-any-return]


def roundtrip(ctx: zmq.Context[zmq.Socket[bytes]], ipc_dir: Path, name: str) -> None:
    """Send one message through a streamer device and receive it, within 5 s."""
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    for s in (push, pull):
        s.setsockopt(zmq.LINGER, 0)
    push.connect(f"ipc://{ipc_dir}/{name}-in")
    pull.connect(f"ipc://{ipc_dir}/{name}-out")
    pull.setsockopt(zmq.RCVTIMEO, 5000)
    token = os.urandom(8)
    push.send(token)
    assert pull.recv() == token
    push.close()
    pull.close()


def test_start_status_traffic_and_clean_stop(ipc_dir: Path, ctx: Any) -> None:
    config = make_config(ipc_dir, {"a": streamer(ipc_dir, "a"), "b": streamer(ipc_dir, "b")})
    with devmgr.Manager(config) as manager:
        status = manager.status()
        assert status["manager"]["pid"] == os.getpid()
        states = {d["name"]: d["state"] for d in status["devices"]}
        assert states == {"a": "running", "b": "running"}
        pids = {d["pid"] for d in status["devices"]}
        assert all(psutil.pid_exists(p) for p in pids)
        roundtrip(ctx, ipc_dir, "a")
        roundtrip(ctx, ipc_dir, "b")
        wait_until(lambda: device(manager, "a")["msgs_in"] >= 1, what="stats through health")
    assert not any(psutil.pid_exists(p) for p in pids)
    assert not (ipc_dir / "control").exists()


def test_sigkill_restarts_at_once(ipc_dir: Path, ctx: Any) -> None:
    config = make_config(ipc_dir, {"a": streamer(ipc_dir, "a")})
    events: list[tuple[str, dict[str, Any]]] = []
    manager = devmgr.Manager(config)
    manager.on_event = lambda topic, event: events.append((topic, event))
    with manager:
        before = device(manager, "a")
        # stable for the supervisor's stable_after, so the restart is immediate
        wait_until(lambda: device(manager, "a")["uptime_s"] >= 1.0, timeout=5)
        os.kill(before["pid"], signal.SIGKILL)
        after = wait_until(
            lambda: (
                (d := device(manager, "a"))["state"] == "running"
                and d["pid"] != before["pid"]
                and d
            ),
            what="a new running child",
        )
        assert after["restarts"] == 1
        assert after["last_exit"]["signal"] == signal.SIGKILL
        assert after["last_exit"]["code"] is None
        assert after["last_exit"]["reason"] == "killed"
        roundtrip(ctx, ipc_dir, "a")
    topics = [t for t, _ in events]
    assert "device.exited" in topics and topics.count("device.running") >= 2
    exited = next(e for t, e in events if t == "device.exited")
    assert exited["pid"] == before["pid"] and exited["signal"] == signal.SIGKILL


def test_bind_conflict_is_start_failed_then_fatal(ipc_dir: Path, ctx: Any) -> None:
    squatter = ctx.socket(zmq.PULL)
    squatter.setsockopt(zmq.LINGER, 0)
    port = squatter.bind_to_random_port("tcp://127.0.0.1")
    table = {
        "kind": "streamer",
        "in": {"type": "PULL", "bind": [f"tcp://127.0.0.1:{port}"]},
        "out": {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/x-out"]},
        "restart": {"backoff_initial": 0.01, "backoff_max": 0.02, "max_restarts": 2},
    }
    with devmgr.Manager(make_config(ipc_dir, {"x": table})) as manager:
        final = wait_until(
            lambda: (d := device(manager, "x"))["state"] == "fatal" and d, what="fatal"
        )
        assert final["restarts"] == 2
        assert final["last_exit"]["reason"] == "start_failed"
        assert f"tcp://127.0.0.1:{port}" in final["message"]
        assert final["pid"] is None and final["uptime_s"] is None
        # a manual start clears fatal (and fails again, reporting the endpoint)
        squatter.close()
        manager.start_device("x")
        assert device(manager, "x")["state"] == "running"


def test_sigstop_is_unresponsive_and_restarted(ipc_dir: Path) -> None:
    table = streamer(ipc_dir, "s", health={"ping_timeout": 0.3})
    with devmgr.Manager(make_config(ipc_dir, {"s": table})) as manager:
        pid = device(manager, "s")["pid"]
        os.kill(pid, signal.SIGSTOP)
        after = wait_until(
            lambda: (d := device(manager, "s"))["state"] == "running" and d["pid"] != pid and d,
            timeout=10,
            what="restart after the hang",
        )
        assert after["last_exit"]["reason"] == "unresponsive"
        assert after["last_exit"]["signal"] == signal.SIGKILL
        assert after["restarts"] == 1


def test_memory_limit_restarts_with_reason_memory(ipc_dir: Path, ctx: Any) -> None:
    # An unbounded send queue towards a peer that never comes: the device's memory grows.
    hole = ctx.socket(zmq.PULL)
    hole_port = hole.bind_to_random_port("tcp://127.0.0.1")
    hole.close(linger=0)
    table = {
        "kind": "streamer",
        "in": {"type": "PULL", "bind": [f"ipc://{ipc_dir}/m-in"], "options": {"rcvhwm": 0}},
        "out": {
            "type": "PUSH",
            "connect": [f"tcp://127.0.0.1:{hole_port}"],
            "options": {"sndhwm": 0},
        },
        "health": {"max_rss_mb": 80},
        "restart": {"backoff_initial": 0.05},
    }
    with devmgr.Manager(make_config(ipc_dir, {"m": table})) as manager:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 100)
        push.connect(f"ipc://{ipc_dir}/m-in")
        blob = b"x" * 65536
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            d = device(manager, "m")
            if d["last_exit"] is not None:
                break
            for _ in range(200):  # bounded: at most ~13 MB a round
                try:
                    push.send(blob)
                except zmq.Again:
                    break
        d = device(manager, "m")
        assert d["last_exit"] is not None, "the memory limit never tripped"
        assert d["last_exit"]["reason"] == "memory"
        push.close()


def test_reload_touches_only_what_changed(ipc_dir: Path) -> None:
    first = make_config(
        ipc_dir,
        {
            "keep": streamer(ipc_dir, "keep"),
            "change": streamer(ipc_dir, "change"),
            "drop": streamer(ipc_dir, "drop"),
        },
    )
    second = make_config(
        ipc_dir,
        {
            "keep": streamer(ipc_dir, "keep"),
            "change": streamer(ipc_dir, "change", restart={"backoff_max": 5.0}),
            "new": streamer(ipc_dir, "new"),
        },
    )
    with devmgr.Manager(first) as manager:
        pids = {d["name"]: d["pid"] for d in manager.status()["devices"]}
        result = manager.reload(second)
        assert result == {
            "config": None,  # a ManagerConfig handed over in-process has no file
            "added": ["new"],
            "removed": ["drop"],
            "changed": ["change"],
            "unchanged": ["keep"],
        }
        now = {d["name"]: d for d in manager.status()["devices"]}
        assert set(now) == {"keep", "change", "new"}
        assert now["keep"]["pid"] == pids["keep"]
        assert now["change"]["pid"] != pids["change"]
        assert all(d["state"] == "running" for d in now.values())
        assert not psutil.pid_exists(pids["drop"]) or psutil.Process(pids["drop"]).status() == (
            psutil.STATUS_ZOMBIE
        )


def test_add_conflict_keeps_nothing_and_remove(ipc_dir: Path) -> None:
    with devmgr.Manager(make_config(ipc_dir, {"a": streamer(ipc_dir, "a")})) as manager:
        clash = streamer(ipc_dir, "a") | {"name": "b"}
        with pytest.raises(devmgr.ControlError) as info:
            manager.add(clash)
        assert info.value.code == "conflict"
        assert [d["name"] for d in manager.status()["devices"]] == ["a"]
        added = manager.add(streamer(ipc_dir, "b") | {"name": "b"})
        assert added["state"] == "running"
        with pytest.raises(devmgr.ControlError) as info:
            manager.add(streamer(ipc_dir, "c") | {"name": "b"})
        assert info.value.code == "conflict"
        manager.remove("b")
        assert [d["name"] for d in manager.status()["devices"]] == ["a"]
        with pytest.raises(devmgr.ControlError) as info:
            manager.remove("b")
        assert info.value.code == "unknown_device"


def test_sigterm_from_outside_drains_and_exits_zero(ipc_dir: Path) -> None:
    table = streamer(ipc_dir, "t", restart={"policy": "on-failure"})
    with devmgr.Manager(make_config(ipc_dir, {"t": table})) as manager:
        pid = device(manager, "t")["pid"]
        os.kill(pid, signal.SIGTERM)
        d = wait_until(lambda: (d := device(manager, "t"))["state"] == "stopped" and d)
        assert d["last_exit"]["code"] == 0 and d["last_exit"]["signal"] is None
        assert d["last_exit"]["reason"] == "exited"
        assert d["restarts"] == 0


def test_pause_resume_and_manual_restart(ipc_dir: Path, ctx: Any) -> None:
    with devmgr.Manager(make_config(ipc_dir, {"p": streamer(ipc_dir, "p")})) as manager:
        assert manager.pause("p")["state"] == "paused"
        assert manager.resume("p")["state"] == "running"
        pid = device(manager, "p")["pid"]
        after = manager.restart("p")
        assert after["state"] == "running" and after["pid"] != pid
        assert after["restarts"] == 0  # manual restarts are not counted
        assert after["last_exit"]["reason"] == "stopped"
        roundtrip(ctx, ipc_dir, "p")
        stopped = manager.stop_device("p")
        assert stopped["state"] == "stopped" and stopped["pid"] is None


def _write_config(ipc_dir: Path, names: list[str]) -> Path:
    lines = [
        "[manager]",
        f'control = "ipc://{ipc_dir}/control"',
        f'events = "ipc://{ipc_dir}/events"',
        "stop_timeout = 2.0",
    ]
    for name in names:
        lines += [
            f"[devices.{name}]",
            'kind = "streamer"',
            f'in = {{ type = "PULL", bind = ["ipc://{ipc_dir}/{name}-in"] }}',
            f'out = {{ type = "PUSH", bind = ["ipc://{ipc_dir}/{name}-out"] }}',
        ]
    path = ipc_dir / "devmgr.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _request(ctx: Any, endpoint: str, cmd: str, **args: Any) -> Any:
    import json

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(endpoint)
    sock.send(json.dumps({"v": 1, "id": 1, "cmd": cmd, "args": args}).encode())
    try:
        return json.loads(sock.recv())
    finally:
        sock.close()


def _start_cli(config: Path, stderr: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "devmgr", "start", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


def _wait_running(ctx: Any, endpoint: str, count: int) -> list[int]:
    def ready() -> list[int] | None:
        try:
            reply = _request(ctx, endpoint, "status")
        except zmq.Again:
            return None
        devices = reply["result"]["devices"]
        if len(devices) == count and all(d["state"] == "running" for d in devices):
            return [d["pid"] for d in devices]
        return None

    return wait_until(ready, timeout=20, interval=0.05, what="all devices running")


def test_manager_sigkill_leaves_no_orphans(ipc_dir: Path, ctx: Any) -> None:
    config = _write_config(ipc_dir, ["a", "b", "c"])
    proc = _start_cli(config)
    try:
        pids = _wait_running(ctx, f"ipc://{ipc_dir}/control", 3)
        proc.kill()
        proc.wait(5)
        t0 = time.monotonic()
        wait_until(lambda: all(process_gone(p) for p in pids), timeout=2.0)
        assert time.monotonic() - t0 <= 2.0
        # a new manager can bind the same endpoints at once
        proc2 = _start_cli(config)
        try:
            _wait_running(ctx, f"ipc://{ipc_dir}/control", 3)
        finally:
            proc2.send_signal(signal.SIGTERM)
            assert proc2.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_start_sigterm_exits_zero(ipc_dir: Path, ctx: Any) -> None:
    config = _write_config(ipc_dir, ["a"])
    proc = _start_cli(config, stderr=subprocess.PIPE)
    try:
        (pid,) = _wait_running(ctx, f"ipc://{ipc_dir}/control", 1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=2.0 + 1.0)  # stop_timeout + 1 s
        assert proc.returncode == 0
        assert not psutil.pid_exists(pid)
        assert "device.running a" in stderr.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- regressions from review ----------------------------------------------------------


def test_failed_bind_raises_and_hangs_nothing(ipc_dir: Path) -> None:
    (ipc_dir / "afile").write_text("not a folder")
    config = make_config(ipc_dir, {}, control=f"ipc://{ipc_dir}/afile/control")
    manager = devmgr.Manager(config)
    t0 = time.monotonic()
    with pytest.raises(devmgr.DevmgrError):
        manager.start()
    assert time.monotonic() - t0 < 5.0
    manager.stop()  # a no-op after a failed start, and it returns


def test_second_manager_leaves_the_first_ones_sockets(ipc_dir: Path, ctx: Any) -> None:
    config = make_config(ipc_dir, {"a": streamer(ipc_dir, "a")})
    with devmgr.Manager(config):
        second = devmgr.Manager(make_config(ipc_dir, {}))
        with pytest.raises(devmgr.DevmgrError, match="in use"):
            second.start()
        assert (ipc_dir / "control").exists() and (ipc_dir / "events").exists()
        assert _request(ctx, f"ipc://{ipc_dir}/control", "ping")["result"] == "pong"


def test_commands_queued_behind_remove_are_refused(ipc_dir: Path, ctx: Any) -> None:
    import json

    with devmgr.Manager(make_config(ipc_dir, {"x": streamer(ipc_dir, "x")})) as manager:
        pid = device(manager, "x")["pid"]
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(f"ipc://{ipc_dir}/control")
        sock.send(json.dumps({"v": 1, "id": 1, "cmd": "remove", "args": {"name": "x"}}).encode())
        sock.send(json.dumps({"v": 1, "id": 2, "cmd": "start", "args": {"names": ["x"]}}).encode())
        replies = {r["id"]: r for r in (json.loads(sock.recv()) for _ in range(2))}
        sock.close()
        assert replies[1]["ok"] is True
        assert replies[2]["ok"] is False
        assert replies[2]["error"]["code"] == "unknown_device"
        assert manager.status()["devices"] == []
        wait_until(lambda: not psutil.pid_exists(pid), what="the removed device to exit")


def test_a_dead_zygote_is_replaced(ipc_dir: Path, ctx: Any) -> None:
    from devmgr._zygote import ZYGOTE

    with devmgr.Manager(make_config(ipc_dir, {"a": streamer(ipc_dir, "a")})) as manager:
        server_pid = ZYGOTE.pid
        assert server_pid
        os.kill(server_pid, signal.SIGKILL)  # the device dies with it (PDEATHSIG)
        after = wait_until(
            lambda: (d := device(manager, "a"))["state"] == "running" and d["restarts"] >= 1 and d,
            timeout=10,
            what="a running device from a new zygote",
        )
        assert ZYGOTE.pid not in (None, server_pid)
        assert after["restarts"] == 1
        roundtrip(ctx, ipc_dir, "a")


def test_a_raising_on_event_callback_does_not_break_supervision(ipc_dir: Path) -> None:
    calls: list[str] = []

    def callback(topic: str, event: dict[str, Any]) -> None:
        calls.append(topic)
        raise RuntimeError("user bug")

    manager = devmgr.Manager(make_config(ipc_dir, {"a": streamer(ipc_dir, "a")}))
    manager.on_event = callback
    with manager:
        pid = device(manager, "a")["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: (d := device(manager, "a"))["state"] == "running" and d["pid"] != pid)
    assert "device.exited" in calls


def test_stop_with_timeout_leaves_no_process(ipc_dir: Path) -> None:
    table = streamer(ipc_dir, "h", health={"ping_timeout": 30.0})
    manager = devmgr.Manager(make_config(ipc_dir, {"h": table}, stop_timeout=20.0))
    manager.start()
    pid = device(manager, "h")["pid"]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    manager.stop(timeout=0.5)
    assert time.monotonic() - t0 < 6.0
    wait_until(lambda: not psutil.pid_exists(pid), what="the stopped device to be killed")


def test_add_refuses_an_ipc_endpoint_another_process_listens_on(ipc_dir: Path, ctx: Any) -> None:
    foreign = ctx.socket(zmq.PULL)
    foreign.setsockopt(zmq.LINGER, 0)
    foreign.bind(f"ipc://{ipc_dir}/taken")
    with devmgr.Manager(make_config(ipc_dir, {})) as manager:
        spec = {
            "name": "t",
            "kind": "streamer",
            "in": {"type": "PULL", "bind": [f"ipc://{ipc_dir}/taken"]},
            "out": {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/t-out"]},
        }
        with pytest.raises(devmgr.ControlError) as info:
            manager.add(spec)
        assert info.value.code == "conflict"
        assert f"ipc://{ipc_dir}/taken" in info.value.message
        assert manager.status()["devices"] == []
    foreign.close()


def test_pause_of_a_stopped_device_is_refused(ipc_dir: Path) -> None:
    table = streamer(ipc_dir, "p", autostart=False)
    with devmgr.Manager(make_config(ipc_dir, {"p": table})) as manager:
        with pytest.raises(devmgr.ControlError) as info:
            manager.pause("p")
        assert info.value.code == "conflict"
        assert device(manager, "p")["state"] == "stopped"


def test_protocol_version_must_be_the_integer_one(ipc_dir: Path, ctx: Any) -> None:
    import json

    with devmgr.Manager(make_config(ipc_dir, {})):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 3000)
        sock.connect(f"ipc://{ipc_dir}/control")
        for v in (True, 1.0, "1", 2):
            sock.send(json.dumps({"v": v, "id": 7, "cmd": "ping"}).encode())
            reply = json.loads(sock.recv())
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request", v
        sock.send(json.dumps({"v": 1, "id": 8, "cmd": "ping"}).encode())
        assert json.loads(sock.recv())["result"] == "pong"
        sock.close()
