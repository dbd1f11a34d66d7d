"""devmgr.AsyncClient against real managers: every method, concurrency, errors, timeouts,
under asyncio's default loop and uvloop; event streams (sync and async) and their close."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from ctl_support import manager_process, private_env, streamer, write_config

import devmgr
from devmgr import AsyncClient, Client, ControlError, ManagerUnreachable
from devmgr._config import load_config, parse_device

from conftest import wait_until

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def run(loop: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if loop == "uvloop":
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))
    for name in ("DEVMGR_ENDPOINT", "DEVMGR_CONFIG", "DEVMGR_CURVE_CLIENT", "DEVMGR_CURVE_SERVER"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def manager(ipc_dir: Path) -> Iterator[devmgr.Manager]:
    path = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    with devmgr.Manager(load_config(path)) as running:
        yield running


def control(ipc_dir: Path) -> str:
    return f"ipc://{ipc_dir}/control"


def test_same_methods_and_signatures_as_client() -> None:
    public = {n for n in dir(Client) if not n.startswith("_")} - {"curve_keys"}
    for name in sorted(public):
        member = getattr(AsyncClient, name)
        assert callable(member), name
        if name in ("close", "events"):
            assert not inspect.iscoroutinefunction(member), name
        else:
            assert inspect.iscoroutinefunction(member), name
        ours = inspect.signature(member)
        theirs = inspect.signature(getattr(Client, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        if name != "events":
            assert ours.return_annotation == theirs.return_annotation, name
    init = inspect.signature(AsyncClient.__init__).parameters
    assert list(init) == ["self", "endpoint", "timeout", "curve"]
    assert init["timeout"].default == 5.0 and init["endpoint"].default is None


@LOOPS
def test_every_method(loop: str, ipc_dir: Path, manager: devmgr.Manager) -> None:
    async def main() -> None:
        async with AsyncClient(control(ipc_dir), timeout=10) as client:
            assert await client.ping() == "pong"
            assert await client.version() == {"version": devmgr.__version__, "protocol": 1}
            status = await client.status()
            assert status["manager"]["pid"] == os.getpid()
            assert [d["name"] for d in status["devices"]] == ["a"]
            assert (await client.status("a"))["devices"][0]["state"] == "running"
            stats = await client.stats("a")
            assert len(stats) == 8 and stats["in_msgs_received"] == 0
            assert (await client.pause("a"))["state"] == "paused"
            assert (await client.resume("a"))["state"] == "running"
            assert [d["state"] for d in await client.stop("a")] == ["stopped"]
            assert [d["state"] for d in await client.start("*")] == ["running"]
            (before,) = (await client.status("a"))["devices"]
            (after,) = await client.restart("a")
            assert after["state"] == "running" and after["pid"] != before["pid"]
            assert (await client.logs("a", lines=5)) == Client(control(ipc_dir)).logs("a", 5)
            assert (await client.add({"name": "b", **streamer(ipc_dir, "b")}))["state"] == "running"
            spec = parse_device({"name": "c", **streamer(ipc_dir, "c")})
            assert (await client.add(spec))["name"] == "c"
            assert await client.remove("b") is None
            assert await client.remove("c") is None
            assert (await client.reload())["unchanged"] == ["a"]
            assert await client.shutdown() is None

    run(loop, main)
    wait_until(lambda: not manager.running, what="the manager to stop")


@LOOPS
def test_many_concurrent_calls(loop: str, ipc_dir: Path, manager: devmgr.Manager) -> None:
    """Hundreds of calls in flight from one client each get their own reply, and a long
    restart in flight does not hold up the short calls beside it."""

    async def main() -> None:
        async with AsyncClient(control(ipc_dir), timeout=20) as client:
            calls: list[Coroutine[Any, Any, Any]] = []
            for i in range(300):
                calls.append((client.ping, client.version, client.status)[i % 3]())
            results = await asyncio.gather(*calls)
            for i, result in enumerate(results):
                if i % 3 == 0:
                    assert result == "pong"
                elif i % 3 == 1:
                    assert result["protocol"] == 1
                else:
                    assert result["devices"][0]["name"] == "a"
            # errors come back to the call that caused them, among good calls
            good = [client.status("a") for _ in range(20)]
            bad = [client.pause(f"nope{i}") for i in range(20)]
            outcome = await asyncio.gather(*good, *bad, return_exceptions=True)
            assert all(r["devices"][0]["name"] == "a" for r in outcome[:20])  # type: ignore[index]
            for i, error in enumerate(outcome[20:]):
                assert isinstance(error, ControlError) and error.code == "unknown_device"
                assert f"nope{i}" in error.message
            # an unreadable request (over 1 MiB: answered with id null) fails alone
            huge = client.request("ping", {"pad": "x" * (1 << 20)})
            pings = [client.ping() for _ in range(10)]
            outcome = await asyncio.gather(huge, *pings, return_exceptions=True)
            assert isinstance(outcome[0], ControlError) and outcome[0].code == "too_large"
            assert outcome[1:] == ["pong"] * 10
            restart = asyncio.ensure_future(client.restart("a"))
            pinged = 0
            while not restart.done() and pinged < 1000:
                assert await client.ping() == "pong"
                pinged += 1
            (after,) = await restart
            assert after["state"] == "running"

    run(loop, main)


def test_errors_and_refusals(ipc_dir: Path, manager: devmgr.Manager) -> None:
    async def main() -> None:
        async with AsyncClient(control(ipc_dir)) as client:
            with pytest.raises(ControlError) as info:
                await client.status("a", "nope")
            assert info.value.code == "unknown_device"
            with pytest.raises(ControlError) as info:
                await client.add({"name": "x", "kind": "bogus"})
            assert info.value.code == "invalid_spec"
            with pytest.raises(ControlError) as info:
                await client.request("frobnicate")
            assert info.value.code == "unknown_command"
            with pytest.raises(ValueError):
                await client.start()
            with pytest.raises(TypeError):
                await client.add(42)
            assert await client.ping() == "pong"
        with pytest.raises(devmgr.DevmgrError, match="closed"):
            await client.ping()

    asyncio.run(main())


@pytest.mark.parametrize("where", ["ipc", "stale ipc"])
def test_unreachable_at_once_when_nothing_listens(where: str, ipc_dir: Path) -> None:
    import socket

    if where == "stale ipc":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(ipc_dir / "nobody"))
        stale.close()

    async def main() -> None:
        async with AsyncClient(f"ipc://{ipc_dir}/nobody", timeout=30) as client:
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(ManagerUnreachable, match="nothing listens") as caught:
                    await client.ping()
                assert time.monotonic() - started < 10  # not the 30 s timeout
                assert caught.value.listening is False
                assert ("stale" in str(caught.value)) == (where == "stale ipc")

    asyncio.run(main())


def test_timeout_does_not_poison_the_next_request(ipc_dir: Path) -> None:
    """A frozen manager times requests out; once it thaws, the next ones get their own
    replies; and the host loop kept running meanwhile."""
    from test_client import all_threads_stopped

    config = write_config(ipc_dir / "devmgr.toml", {})
    with manager_process(config, private_env(ipc_dir)) as proc:

        async def main() -> None:
            async with AsyncClient(control(ipc_dir), timeout=5) as client:
                assert await client.ping() == "pong"
                os.kill(proc.pid, signal.SIGSTOP)
                wait_until(lambda: all_threads_stopped(proc.pid), what="the manager to stop")
                ticks = 0

                async def tick() -> None:
                    nonlocal ticks
                    while True:
                        await asyncio.sleep(0.01)
                        ticks += 1

                ticker = asyncio.ensure_future(tick())
                try:
                    started = time.monotonic()
                    outcome = await asyncio.gather(
                        *(client.request("ping", timeout=0.3) for _ in range(5)),
                        return_exceptions=True,
                    )
                    assert time.monotonic() - started >= 0.25
                    for error in outcome:
                        assert isinstance(error, ManagerUnreachable), error
                        assert error.listening is True
                        assert "did not answer" in str(error)
                    assert ticks >= 5  # the loop was never blocked by the waits
                finally:
                    ticker.cancel()
                    os.kill(proc.pid, signal.SIGCONT)
                status = await client.status()
                assert status["manager"]["pid"] == proc.pid
                assert (await client.version())["protocol"] == 1

        asyncio.run(main())


# ---- event streams ----------------------------------------------------------------------


def _toggle_until(client: Client, got: Callable[[], bool], name: str = "a") -> None:
    """Pause and resume `name` until `got()`: the SUB's subscription takes a moment."""
    for _ in range(200):
        client.pause(name)
        client.resume(name)
        if wait_until_or_false(got, 0.1):
            return
    raise AssertionError("no event arrived")


def wait_until_or_false(predicate: Callable[[], bool], timeout: float) -> bool:
    try:
        return bool(wait_until(predicate, timeout=timeout))
    except AssertionError:
        return False


def test_sync_events_iterate_filter_and_end_on_close(ipc_dir: Path) -> None:
    path = write_config(
        ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a"), "b": streamer(ipc_dir, "b")}
    )
    with devmgr.Manager(load_config(path)), Client(control(ipc_dir)) as client:
        with pytest.raises(ValueError, match="unknown event kind"):
            client.events(kinds=["device.exitd"])
        with pytest.raises(TypeError):
            client.events(devices="a")  # type: ignore[arg-type]
        stream = client.events(devices=["a"], kinds=["device.paused", "device.resumed"])
        seen: list[dict[str, Any]] = []
        ended = threading.Event()

        def consume() -> None:
            for event in stream:
                seen.append(event)
            ended.set()

        thread = threading.Thread(target=consume)
        thread.start()
        try:
            _toggle_until(client, lambda: len(seen) >= 2)
            client.pause("b")
            client.resume("b")
            client.pause("a")
            wait_until(lambda: seen[-1]["event"] == "device.paused" and len(seen) % 2, 5)
            assert {e["device"] for e in seen} == {"a"}
            assert {e["event"] for e in seen} == {"device.paused", "device.resumed"}
        finally:
            stream.close()  # from another thread: the waiting iteration ends
            assert ended.wait(5), "the iteration did not end on close"
            thread.join(5)
        # the client's close ends its streams too, and a closed stream stays ended
        second = client.events()
        client.close()
        assert list(second) == []
        assert list(stream) == []


@LOOPS
def test_async_events_iterate_and_end_on_close(loop: str, ipc_dir: Path) -> None:
    path = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    with devmgr.Manager(load_config(path)):

        async def main() -> None:
            async with AsyncClient(control(ipc_dir)) as client:
                seen: list[dict[str, Any]] = []
                stream = client.events(kinds=["device."])

                async def consume() -> None:
                    async for event in stream:
                        seen.append(event)

                consumer = asyncio.ensure_future(consume())
                for _ in range(200):
                    await client.pause("a")
                    await client.resume("a")
                    for _ in range(20):  # give the consumer its turns
                        if len(seen) >= 2:
                            break
                        await asyncio.sleep(0.005)
                    if len(seen) >= 2:
                        break
                assert {"device.paused", "device.resumed"} <= {e["event"] for e in seen}
                assert all(e["device"] == "a" for e in seen)
                stream.close()
                await asyncio.wait_for(consumer, 5)  # ended, not cancelled
                assert consumer.exception() is None
                # the client's close ends a waiting stream
                other = client.events(devices=["a"])
                waiting = asyncio.ensure_future(anext(other, None))
                for _ in range(500):  # until it has opened and waits on its socket
                    if other._waiting and other._sock is not None:
                        break
                    await asyncio.sleep(0.01)
                assert not waiting.done()
                client.close()
                assert await asyncio.wait_for(waiting, 5) is None

        run(loop, main)
