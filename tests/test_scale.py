"""Many devices on one manager: a big start or a restart storm never stalls control."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_manager import make_config, streamer

import devmgr
from devmgr import _fleet

from conftest import wait_until

_DEVICES = 64
# enough that forking them all takes a while even on a fast machine
_MANY = 160


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def _request(sock: zmq.Socket[bytes], rid: int, cmd: str, **args: Any) -> None:
    sock.send(json.dumps({"v": 1, "id": rid, "cmd": cmd, "args": args}).encode())


def _replies(sock: zmq.Socket[bytes], count: int) -> dict[int, Any]:
    out = {}
    while len(out) < count:
        assert sock.poll(60_000), f"no reply within 60 s ({len(out)} of {count})"
        reply = json.loads(sock.recv())
        out[reply["id"]] = reply
    return out


def test_a_large_start_forks_in_slices_and_answers_control_meanwhile(ipc_dir: Path) -> None:
    names = [f"d{i}" for i in range(_MANY)]
    config = make_config(ipc_dir, {n: streamer(ipc_dir, n, autostart=False) for n in names})
    ctx = zmq.Context()
    with devmgr.Manager(config):
        events = ctx.socket(zmq.SUB)
        events.linger = 0
        events.setsockopt(zmq.SUBSCRIBE, b"device.starting")
        events.connect(f"ipc://{ipc_dir}/events")
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"ipc://{ipc_dir}/control")
        _request(sock, 0, "ping")
        _replies(sock, 1)
        # the subscription is in place once a probe event arrives
        _request(sock, 1, "start", names=["d0"])
        assert events.poll(10_000)
        events.recv_multipart()
        _replies(sock, 1)
        _request(sock, 2, "start", names=["*"])
        assert events.poll(30_000), "no device.starting event"  # forking has begun
        _request(sock, 3, "status")
        during = _replies(sock, 1)[3]["result"]["devices"]
        # forked inside one turn of the loop, the start held this status until the last
        # fork; in slices, it is answered while most devices still wait their turn
        waiting = [d["name"] for d in during if d["pid"] is None]
        forked = [d["name"] for d in during if d["pid"] is not None]
        assert waiting, "status was answered only after every device was forked"
        assert len(forked) > 1, forked
        assert all(d["state"] == "starting" for d in during if d["pid"] is None)
        replies = _replies(sock, 1)
        assert replies[2]["ok"], replies[2]
        _request(sock, 4, "status")
        after = _replies(sock, 1)[4]["result"]["devices"]
        assert [d["state"] for d in after] == ["running"] * _MANY
        sock.close()
        events.close()
    ctx.term()


def test_a_device_stopped_before_its_turn_to_fork_is_never_forked(ipc_dir: Path) -> None:
    names = [f"d{i}" for i in range(_DEVICES)]
    config = make_config(ipc_dir, {n: streamer(ipc_dir, n, autostart=False) for n in names})
    ctx = zmq.Context()
    with devmgr.Manager(config) as manager:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"ipc://{ipc_dir}/control")
        last = names[-1]
        _request(sock, 1, "start", names=["*"])
        _request(sock, 2, "stop", names=[last])
        replies = _replies(sock, 2)
        assert replies[1]["ok"], replies[1]
        assert replies[2]["ok"], replies[2]
        states = {d["name"]: d for d in manager.status()["devices"]}
        assert states[last]["state"] == "stopped"
        assert states[last]["pid"] is None
        assert states[last]["restarts"] == 0
        assert all(states[n]["state"] == "running" for n in names[:-1])
        sock.close()
    ctx.term()


def test_spread_sampling_still_samples_everyone_and_every_memory_limit_each_tick(
    ipc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one /proc sample per tick: four devices are each sampled every fourth tick...
    monkeypatch.setattr(_fleet, "_SAMPLES_PER_TICK", 1)
    devices = {n: streamer(ipc_dir, n) for n in ("a", "b", "c")}
    # ...except one with a memory limit, sampled (and so caught) at every tick
    devices["fat"] = streamer(ipc_dir, "fat", health={"max_rss_mb": 1})
    events: list[tuple[str, dict[str, Any]]] = []
    with devmgr.Manager(make_config(ipc_dir, devices, health_interval=0.2)) as manager:
        manager.on_event = lambda topic, event: events.append((topic, event))
        wait_until(
            lambda: any(
                t == "device.exited" and e["device"] == "fat" and e["reason"] == "memory"
                for t, e in events
            ),
            timeout=10.0,
        )
        wait_until(
            lambda: all(d["rss_bytes"] for d in manager.status(["a", "b", "c"])["devices"]),
            timeout=10.0,
        )
