"""Operations as sequential code: typed futures and coroutines on the manager's loop.

The first tests drive devmgr._tasks by hand (no loop, no processes); the last one runs a
rolling restart, written as a plain `for` loop over awaits, against real device children.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import devmgr
from devmgr._config import parse_config
from devmgr._errors import ControlError
from devmgr._tasks import Pending, gather, settled, spawn


def test_a_coroutine_runs_in_order_across_its_waits() -> None:
    first: Pending[int] = Pending()
    second: Pending[str] = Pending()
    seen: list[Any] = []

    async def operation() -> str:
        seen.append("began")
        seen.append(await first)
        seen.append(await second)
        return "over"

    task = spawn(operation())
    assert seen == ["began"] and not task.done()
    second.set_result("b")  # resolved early: read when the coroutine gets there
    assert seen == ["began"]
    first.set_result(1)
    assert seen == ["began", 1, "b"]
    assert task.result() == "over"


def test_a_control_error_is_the_outcome_and_can_be_caught() -> None:
    refused: Pending[None] = Pending()

    async def inner() -> None:
        await refused

    async def outer() -> str:
        try:
            await spawn(inner())
        except ControlError as exc:
            return f"caught {exc.code}"
        return "not caught"

    task = spawn(outer())
    refused.set_error(ControlError("conflict", "taken"))
    assert task.result() == "caught conflict"
    with pytest.raises(ControlError, match="taken"):
        spawn(inner()).result()


def test_a_bug_in_an_operation_is_an_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    async def buggy() -> None:
        raise KeyError("oops")

    task = spawn(buggy())
    error = task.error()
    assert error is not None and error.code == "internal" and "KeyError" in error.message
    assert "internal error in an operation" in caplog.text


def test_gather_waits_for_all_and_joins_their_errors() -> None:
    a: Pending[None] = Pending()
    b: Pending[None] = Pending()
    c: Pending[None] = Pending()
    both = gather([a, b, c])
    a.set_error(ControlError("conflict", "a failed"))
    b.set_result(None)
    assert not both.done()  # the first error does not end the wait for the others
    c.set_error(ControlError("invalid_spec", "c failed"))
    error = both.error()
    assert error is not None and (error.code, error.message) == ("conflict", "a failed; c failed")
    assert gather([]).result() is None
    assert settled(a).result() is None  # settled never fails


def test_callbacks_run_in_the_order_they_were_added() -> None:
    order: list[str] = []
    pending: Pending[int] = Pending()
    pending.add_done_callback(lambda p: order.append(f"one {p.result()}"))
    pending.add_done_callback(lambda p: order.append("two"))
    pending.set_result(7)
    pending.set_result(8)  # only the first resolution counts
    pending.add_done_callback(lambda p: order.append(f"late {p.result()}"))
    assert order == ["one 7", "two", "late 7"]


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def _streamer(ipc_dir: Path, name: str) -> dict[str, Any]:
    return {
        "kind": "streamer",
        "in": {"type": "PULL", "bind": [f"ipc://{ipc_dir}/{name}-in"]},
        "out": {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/{name}-out"]},
    }


def test_rolling_restart_restarts_one_device_at_a_time(ipc_dir: Path) -> None:
    settings = {"control": f"ipc://{ipc_dir}/control", "events": f"ipc://{ipc_dir}/events"}
    devices = {n: _streamer(ipc_dir, n) for n in ["a", "b", "c"]}
    config = parse_config({"manager": settings, "devices": devices})
    events: list[tuple[str, str]] = []
    manager = devmgr.Manager(config)
    manager.on_event = lambda topic, event: events.append((topic, event.get("device", "")))
    with manager:
        before = {d["name"]: d["pid"] for d in manager.status()["devices"]}
        events.clear()
        after = manager._run(lambda ops: ops.rolling_restart(["c", "a", "b"]))
        assert [d["name"] for d in after] == ["c", "a", "b"]
        assert all(d["state"] == "running" and d["pid"] != before[d["name"]] for d in after)
        # each device is running again before the next one is stopped
        lifecycle = [(t, d) for t, d in events if t in ("device.exited", "device.running")]
        assert lifecycle == [
            ("device.exited", "c"),
            ("device.running", "c"),
            ("device.exited", "a"),
            ("device.running", "a"),
            ("device.exited", "b"),
            ("device.running", "b"),
        ]
        with pytest.raises(ControlError, match="no device named 'x'"):
            manager._run(lambda ops: ops.rolling_restart(["a", "x"]))


def test_a_long_queue_of_quick_operations_does_not_recurse(tmp_path: Path) -> None:
    """Thousands of operations queued behind a slow one, each over at once, all answer.

    Each finished operation starting the next one in the same call stack made a queue
    of a few hundred (`pause` requests of a device that is stopping) a RecursionError
    that left the rest unanswered and the device's queue stuck for good.
    """
    import zmq

    from devmgr._config import parse_device
    from devmgr._fleet import Fleet
    from devmgr._loop import EventLoop

    loop = EventLoop()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        fleet = Fleet(
            loop, ctx, tmp_path, lambda *a, **k: None, health_interval=1.0, stop_timeout=1.0
        )
        spec = parse_device(
            {
                "name": "d",
                "kind": "streamer",
                "in": {"type": "PULL", "bind": [f"ipc://{tmp_path}/in"]},
                "out": {"type": "PUSH", "bind": [f"ipc://{tmp_path}/out"]},
            }
        )
        dev = fleet.add_device(spec)
        slow: Pending[None] = Pending()

        async def wait_for_slow() -> None:
            await slow

        async def refused() -> None:
            raise ControlError("conflict", "not running")

        fleet.serialised(dev, wait_for_slow)
        queued = [fleet.serialised(dev, refused) for _ in range(3000)]
        queued[-1].add_done_callback(lambda _p: loop.stop())
        loop.call_later(0, lambda: slow.set_result(None))
        loop.call_later(20.0, loop.stop)  # a bound, should the queue stall
        loop.run()
        answered = [p for p in queued if p.done()]
        assert len(answered) == len(queued)
        assert all(p.error() is not None and p.error().code == "conflict" for p in queued)
    finally:
        loop.close()
        ctx.destroy(linger=0)
