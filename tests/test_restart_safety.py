"""Restarts that are safe for the traffic (issue 10, part 1): no reply to the wrong client.

libzmq draws a new ROUTER's peer routing ids from libc's rand(), which it never seeds;
devmgr seeds it in every device process it starts. These tests use real device
processes, real REQ/REP peers and real restarts.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from pirate_support import EchoWorker, LazyPirateClient

import devmgr
from devmgr._config import parse_config

from conftest import wait_until

# glibc's first rand() with the default seed: libzmq's first ROUTER peer id when unseeded
UNSEEDED_FIRST_ID = bytes.fromhex("006b8b4567")


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def queue_config(ipc_dir: Path, **device: Any) -> devmgr.ManagerConfig:
    table = {
        "kind": "queue",
        "in": {"type": "ROUTER", "bind": [f"ipc://{ipc_dir}/q-in"]},
        "out": {"type": "DEALER", "bind": [f"ipc://{ipc_dir}/q-out"]},
        **device,
    }
    settings = {
        "control": f"ipc://{ipc_dir}/control",
        "events": f"ipc://{ipc_dir}/events",
        "health_interval": 0.1,
        "stop_timeout": 2.0,
    }
    return parse_config({"manager": settings, "devices": {"q": table}})


def running_pid(manager: devmgr.Manager, name: str, not_pid: int | None = None) -> int:
    def ready() -> int | None:
        (entry,) = manager.status([name])["devices"]
        if entry["state"] == "running" and entry["pid"] not in (None, not_pid):
            return int(entry["pid"])
        return None

    return wait_until(ready, timeout=10.0, what=f"{name} running (not pid {not_pid})")


def first_peer_id(ctx: zmq.Context[Any], in_ep: str, out_ep: str) -> bytes:
    """Connect a fresh DEALER to a queue's ROUTER in-side; return the id it was given.

    A DEALER on the out-side receives [routing id, body]: the id the device's ROUTER
    assigned to the client.
    """
    client = ctx.socket(zmq.DEALER)
    worker = ctx.socket(zmq.DEALER)
    try:
        for sock in (client, worker):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 5000)
        worker.connect(out_ep)
        client.connect(in_ep)
        client.send(b"hello")
        routing_id, body = worker.recv_multipart()
        assert body == b"hello"
        return bytes(routing_id)
    finally:
        client.close(linger=0)
        worker.close(linger=0)


def test_manager_device_processes_in_a_row_give_their_first_peer_different_ids(
    ipc_dir: Path, ctx: Any
) -> None:
    in_ep, out_ep = f"ipc://{ipc_dir}/q-in", f"ipc://{ipc_dir}/q-out"
    ids = []
    with devmgr.Manager(queue_config(ipc_dir)) as manager:
        pid = running_pid(manager, "q")
        for _ in range(3):
            ids.append(first_peer_id(ctx, in_ep, out_ep))
            manager.restart("q")
            pid = running_pid(manager, "q", not_pid=pid)
    assert len(set(ids)) == len(ids), f"device processes repeat routing ids: {ids}"


@pytest.mark.parametrize("kind", ["ProcessMonitoredQueue", "ProcessDevice"])
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_process_devices_in_a_row_give_their_first_peer_different_ids(
    ipc_dir: Path, ctx: Any, kind: str, start_method: str
) -> None:
    ids = []
    for n in range(2):
        in_ep, out_ep = f"ipc://{ipc_dir}/{n}-in", f"ipc://{ipc_dir}/{n}-out"
        if kind == "ProcessMonitoredQueue":
            dev: Any = devmgr.ProcessMonitoredQueue(zmq.ROUTER, zmq.DEALER)
        else:
            dev = devmgr.ProcessDevice(zmq.QUEUE, zmq.ROUTER, zmq.DEALER)
        dev.start_method = start_method
        dev.bind_in(in_ep)
        dev.bind_out(out_ep)
        dev.start()
        try:
            ids.append(first_peer_id(ctx, in_ep, out_ep))
        finally:
            dev.stop(timeout=5.0)
    assert ids[0] != ids[1], f"two {kind} children gave their first peer the same id {ids}"
    assert UNSEEDED_FIRST_ID not in ids


ROUTER_FIRST_ID = """
import sys, zmq
{seed}
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
port = router.bind_to_random_port("tcp://127.0.0.1")
dealer = ctx.socket(zmq.DEALER)
dealer.connect(f"tcp://127.0.0.1:{{port}}")
dealer.send(b"x")
router.setsockopt(zmq.RCVTIMEO, 5000)
print(router.recv_multipart()[0].hex())
ctx.destroy(linger=0)
"""


def _first_id_in_a_fresh_process(seed: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", ROUTER_FIRST_ID.format(seed=seed)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip()


def test_seed_routing_ids_gives_each_process_its_own_ids() -> None:
    # the libzmq default this protects from: every fresh process, the same first id
    plain = {_first_id_in_a_fresh_process("") for _ in range(2)}
    assert plain == {UNSEEDED_FIRST_ID.hex()}
    seeded = [
        _first_id_in_a_fresh_process("import devmgr; devmgr.seed_routing_ids()") for _ in range(2)
    ]
    assert seeded[0] != seeded[1]
    assert UNSEEDED_FIRST_ID.hex() not in seeded


def test_a_reply_held_across_a_restart_never_reaches_another_client(
    ipc_dir: Path, ctx: Any
) -> None:
    """A worker holds client A's reply while the queue restarts; client B must not get it.

    A (a Lazy Pirate client) sends, its reply is held by the worker, A gives up and goes.
    The queue restarts; B is the new process's first peer. Unseeded, B gets the id A had
    in the old process, and the worker's late reply for A, sent on reconnecting, reaches
    B. Seeded, the late reply has no addressee and is dropped; B gets its own.
    """
    in_ep, out_ep = f"ipc://{ipc_dir}/q-in", f"ipc://{ipc_dir}/q-out"
    with devmgr.Manager(queue_config(ipc_dir)) as manager:
        pid = running_pid(manager, "q")
        worker = EchoWorker(ctx, out_ep, hold=True).start()
        try:
            a = LazyPirateClient(ctx, in_ep, "A")
            a.send(b"A:1")
            wait_until(lambda: worker.received == [b"A:1"], what="the worker holds A's request")
            assert a.wait(0.05) is None
            a.close()  # out of retries: A goes away

            manager.restart("q")
            running_pid(manager, "q", not_pid=pid)
            b = LazyPirateClient(ctx, in_ep, "B")
            b.send(b"B:1")

            def b_forwarded() -> bool:
                (entry,) = manager.status(["q"])["devices"]
                return bool(entry["msgs_in"] >= 1)

            wait_until(b_forwarded, what="the new device read B's request")
            worker.release()
            reply = b.wait(5.0)
            b.close()
            assert reply == b"B:1", f"B got {reply!r}: a reply meant for another client"
        finally:
            worker.stop()


# --- part 2: a planned restart's drain waits for the replies it owes ---------------------


def test_drain_quiet_is_validated_against_stop_timeout(ipc_dir: Path) -> None:
    from devmgr._errors import ConfigError

    assert queue_config(ipc_dir).devices["q"].drain_quiet is None  # the loop's 0.1 s
    assert queue_config(ipc_dir, drain_quiet=0.9).devices["q"].drain_quiet == 0.9
    with pytest.raises(ConfigError) as caught:
        queue_config(ipc_dir, drain_quiet=1.0)  # stop_timeout 2.0: at most half of it
    (problem,) = caught.value.problems
    assert problem.where == "devices.q.drain_quiet"
    assert "stop_timeout" in problem.message
    with pytest.raises(ConfigError) as caught:
        queue_config(ipc_dir, drain_quiet=-1.0)
    assert [p.where for p in caught.value.problems] == ["devices.q.drain_quiet"]


def test_add_refuses_a_drain_quiet_longer_than_the_stop_budget(ipc_dir: Path) -> None:
    with devmgr.Manager(queue_config(ipc_dir)) as manager:
        running_pid(manager, "q")
        spec = {
            "name": "slow",
            "kind": "queue",
            "in": {"type": "ROUTER", "bind": [f"ipc://{ipc_dir}/s-in"]},
            "out": {"type": "DEALER", "bind": [f"ipc://{ipc_dir}/s-out"]},
            "drain_quiet": 5.0,
        }
        with pytest.raises(devmgr.ControlError) as caught:
            manager.add(spec)
        assert caught.value.code == "invalid_spec"
        assert "drain_quiet" in str(caught.value)
        assert [d["name"] for d in manager.status()["devices"]] == ["q"]


def test_a_planned_restart_waits_for_a_slow_servers_reply(ipc_dir: Path, ctx: Any) -> None:
    """drain_quiet above the server's reply time: the reply to a request the old process
    read gets back through the drain, and the Lazy Pirate client never times out."""
    in_ep, out_ep = f"ipc://{ipc_dir}/q-in", f"ipc://{ipc_dir}/q-out"
    config = queue_config(ipc_dir, drain_quiet=0.8)
    with devmgr.Manager(config) as manager:
        pid = running_pid(manager, "q")
        worker = EchoWorker(ctx, out_ep, delay=0.5).start()  # a 0.5 s server
        client = LazyPirateClient(ctx, in_ep, "C")
        try:
            client.send(b"C:1")
            wait_until(lambda: worker.received == [b"C:1"], what="the server has the request")
            manager.restart("q")  # returns once the old process drained and the new runs
            running_pid(manager, "q", not_pid=pid)
            assert client.wait(0.0) == b"C:1", "the reply was lost in the planned restart"
        finally:
            client.close()
            worker.stop()
