"""Issue 11, part 5: no request or file can stall supervision or swell the manager's memory.

Each test runs a real `devmgr start` process (or the real CLI) and bounds the time it
waits: a manager that hangs on a FIFO, or stalls its loop on a huge request, fails the
test by missing a deadline instead of hanging it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from ctl_support import (
    RawClient,
    devmgr_command,
    manager_process,
    private_env,
    streamer,
    write_config,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import devmgr
from devmgr._files import MAX_CONFIG_BYTES
from devmgr._spec import Issue, Loc, _keys_conflict, bind_key, find_bind_conflicts
from devmgr._wire import MAX_ERROR_CHARS, MAX_ID_BYTES

from conftest import wait_until


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def _limit_memory() -> None:
    # today's code reads /dev/zero until MemoryError: keep that from eating the machine
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def _cli(ipc_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*devmgr_command(), *args],
        env=private_env(ipc_dir),
        check=False,
        capture_output=True,
        text=True,
        timeout=20,  # a FIFO used to block `validate` and `start` for ever
        preexec_fn=_limit_memory,
    )


def _odd_file(ipc_dir: Path, kind: str) -> Path:
    if kind == "fifo":
        path = ipc_dir / "devmgr.toml"
        os.mkfifo(path)
        return path
    if kind == "dev-zero":
        return Path("/dev/zero")
    if kind == "folder":
        return ipc_dir
    path = ipc_dir / "devmgr.toml"  # a sparse file one byte over the limit
    with path.open("wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    return path


REASONS = {
    "fifo": "a FIFO (named pipe), not a regular file",
    "dev-zero": "a character device, not a regular file",
    "folder": "a folder, not a regular file",
    "too-big": f"{MAX_CONFIG_BYTES + 1} bytes; devmgr reads files of at most 8 MiB",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
@pytest.mark.parametrize("command", ["validate", "start", "add", "ping"])
def test_config_that_is_not_a_regular_file_is_refused_at_once(
    ipc_dir: Path, kind: str, command: str
) -> None:
    path = _odd_file(ipc_dir, kind)
    args = [command, str(path)] if command == "add" else [command, "-c", str(path)]
    result = _cli(ipc_dir, *args)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    out = result.stdout + result.stderr
    assert f"{path}: {REASONS[kind]}" in out, out
    assert "Traceback" not in out and "MemoryError" not in out, out


def test_reload_of_a_config_that_became_a_fifo_answers_and_supervision_goes_on(
    ipc_dir: Path,
) -> None:
    config = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    with manager_process(config, private_env(ipc_dir)):
        config.unlink()
        os.mkfifo(config)
        with devmgr.Client(f"ipc://{ipc_dir}/control", timeout=5.0) as client:
            with pytest.raises(devmgr.ControlError) as caught:
                client.reload()  # used to freeze the manager's loop in open()
            assert caught.value.code == "invalid_spec"
            assert "a FIFO (named pipe), not a regular file" in caught.value.message
            assert client.ping() == "pong"
            assert [d["name"] for d in client.status()["devices"]] == ["a"]


# ---- replies: strict JSON, bounded size, bounded queue --------------------------------


def _strict_loads(raw: bytes) -> dict[str, Any]:
    def refuse(name: str) -> Any:
        raise AssertionError(f"the reply holds {name}, which is not JSON: {raw[:200]!r}")

    value = json.loads(raw, parse_constant=refuse)
    assert isinstance(value, dict)
    return value


@pytest.fixture
def running(ipc_dir: Path) -> Iterator[str]:
    """One `devmgr start` process with one device; yields its control endpoint."""
    config = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    with manager_process(config, private_env(ipc_dir)):
        yield f"ipc://{ipc_dir}/control"


@pytest.fixture
def raw(running: str) -> Iterator[RawClient]:
    ctx: zmq.Context[Any] = zmq.Context()
    client = RawClient(ctx, running)
    try:
        yield client
    finally:
        client.close()
        ctx.term()


@pytest.mark.parametrize(
    "request_text",
    [
        b'{"v": 1, "id": NaN, "cmd": "ping"}',
        b'{"v": 1, "id": Infinity, "cmd": "ping"}',
        b'{"v": 1, "id": -Infinity, "cmd": "ping"}',
        b'{"v": 1, "id": 1e999, "cmd": "ping"}',
        b'{"v": 1, "id": [1, {"x": -1e400}], "cmd": "ping"}',
        b'{"v": 1, "id": 1, "cmd": "status", "args": {"names": [NaN]}}',
    ],
)
def test_non_finite_numbers_are_refused_and_replies_stay_strict_json(
    raw: RawClient, request_text: bytes
) -> None:
    raw.send_frames([request_text])
    (reply_frame,) = raw.recv_frames()
    reply = _strict_loads(reply_frame)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
    assert reply["id"] is None
    assert "not JSON" in reply["error"]["message"], reply
    assert raw.call("ping")["result"] == "pong"


def test_an_id_too_long_to_echo_is_refused(raw: RawClient) -> None:
    reply = raw.call("ping", id="x" * (MAX_ID_BYTES - 2))  # exactly the limit with quotes
    assert reply["ok"] and reply["id"] == "x" * (MAX_ID_BYTES - 2)
    raw.send_frames([json.dumps({"v": 1, "id": "x" * 900_000, "cmd": "ping"}).encode()])
    (frame,) = raw.recv_frames()
    reply = _strict_loads(frame)
    assert reply["id"] is None and reply["error"]["code"] == "bad_request", reply
    assert f"the limit is {MAX_ID_BYTES}" in reply["error"]["message"]
    assert len(frame) < 1024


@pytest.mark.parametrize(
    ("args", "code", "tail"),
    [
        # 130,000 ill-typed names: one pydantic error each (a 13.7 MB reply before)
        (
            {"names": [0] * 130_000},
            "bad_request",
            "at most 10000 items after validation, not 130000",
        ),
        # 9,000 ill-typed names of ~25 bytes: 9,000 problems
        ({"names": [{"x": "y" * 16}] * 9000}, "bad_request", "and 8980 more problems"),
        # 9,000 unknown names of 30 characters, all listed before
        ({"names": [f"{i:030d}" for i in range(9000)]}, "unknown_device", "and 8980 more"),
        # 2,000 unknown keys of 400 characters each
        ({f"{i:0400d}": 1 for i in range(2000)}, "bad_request", "2000 keys; it takes names"),
    ],
)
def test_error_replies_are_bounded(raw: RawClient, args: Any, code: str, tail: str) -> None:
    request = json.dumps({"v": 1, "id": 7, "cmd": "status", "args": args}).encode()
    assert len(request) > 100_000
    raw.send_frames([request])
    (frame,) = raw.recv_frames(timeout=10)
    reply = _strict_loads(frame)
    assert reply["id"] == 7 and reply["error"]["code"] == code, str(reply)[:300]
    assert len(frame) <= MAX_ERROR_CHARS + 1024, len(frame)
    assert reply["error"]["message"].endswith(tail), reply["error"]["message"][-200:]


def test_a_client_that_never_reads_gets_a_bounded_queue(running: str) -> None:
    """6,000 requests whose ~17 KB replies are never read: ~100 MB queued before."""
    ctx: zmq.Context[Any] = zmq.Context()
    flood = ctx.socket(zmq.DEALER)
    flood.setsockopt(zmq.LINGER, 0)
    flood.setsockopt(zmq.RCVHWM, 1)
    flood.setsockopt(zmq.RCVBUF, 4096)
    flood.connect(running)
    names = ["n" * 900 + str(i) for i in range(20)]  # an unknown_device reply of ~17 KB
    request = json.dumps({"v": 1, "id": 1, "cmd": "status", "args": {"names": names}}).encode()
    sent = 6000
    try:
        with devmgr.Client(running, timeout=10.0) as client:
            manager = psutil.Process(client.status()["manager"]["pid"])
            dropped_before = client.status()["manager"]["replies_dropped"]
            rss_before = manager.memory_info().rss
            for _ in range(sent):
                flood.send(request)

            def mostly_dropped() -> bool:
                dropped = client.status()["manager"]["replies_dropped"] - dropped_before
                assert dropped >= sent - 1000, f"{dropped} of {sent} dropped so far"
                return True

            wait_until(mostly_dropped, timeout=30, what="the unread replies to be dropped")
            growth = manager.memory_info().rss - rss_before
            assert growth < 40 << 20, f"the manager grew by {growth >> 20} MiB"
            assert client.ping() == "pong"
            received = 0

            def all_accounted() -> bool:
                nonlocal received
                while flood.poll(0):
                    flood.recv()
                    received += 1
                dropped = client.status()["manager"]["replies_dropped"] - dropped_before
                assert received + dropped == sent, (received, dropped)
                return True

            wait_until(all_accounted, timeout=30, what="each request received or dropped")
            assert received >= 1
    finally:
        flood.close(linger=0)
        ctx.term()


# ---- work proportional to the input stays off the supervision path --------------------

# How long a ping may take while a hostile request is handled. Today's code took 2.6 to
# 16 s on the inputs below; a loop that is never held for long answers in milliseconds.
PING_DEADLINE = 2.0


class Pinger:
    """Ping the manager every 20 ms from a thread of its own; note the slowest answer."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.slowest = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Pinger:
        self._thread.start()
        wait_until(lambda: self.count >= 3, timeout=10, what="the first pongs")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(PING_DEADLINE + 5)

    def _run(self) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                sent = time.monotonic()
                sock.send(json.dumps({"v": 1, "id": self.count, "cmd": "ping"}).encode())
                # wait past the deadline, so that a stall is measured, not just seen
                if sock.poll(int((PING_DEADLINE + 60) * 1000)):
                    sock.recv()
                self.slowest = max(self.slowest, time.monotonic() - sent)
                self.count += 1
                self._stop.wait(0.02)  # the pace of the pings, not a wait for a condition
        finally:
            sock.close(linger=0)
            ctx.term()


def _spec(folder: Path, name: str, **sides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "kind": "streamer",
        "autostart": False,
        "in": {"type": "PULL", "bind": [f"ipc://{folder}/{name}-in"]},
        "out": {"type": "PUSH", "bind": [f"ipc://{folder}/{name}-out"]},
    }
    for side, extra in sides.items():
        spec[side] = {**spec[side], **extra}
    return spec


HOSTILE_ADDS: dict[str, tuple[dict[str, Any], str]] = {
    # 5,000 tcp binds: the bind-conflict check compared each with all before it
    "binds": (
        {"in": {"bind": [f"tcp://127.0.0.1:{20000 + i}" for i in range(5000)]}},
        "devices.x.in.bind: 5000 endpoints; a socket takes at most 64 in bind",
    ),
    # 60,000 unknown options: a did-you-mean each
    "options": (
        {"in": {"options": {f"o{i}": 1 for i in range(60_000)}}},
        "devices.x.in.options: 60000 options; a socket takes at most 64",
    ),
    # 60,000 unknown keys in the socket table: one problem each
    "keys": (
        {"out": {f"k{i}": 1 for i in range(60_000)}},
        "devices.x.out: 60002 keys; this table has only type, bind, connect, options",
    ),
}


@pytest.mark.parametrize("what", sorted(HOSTILE_ADDS))
def test_a_huge_add_is_refused_at_once_and_pings_go_on(
    running: str, ipc_dir: Path, what: str
) -> None:
    sides, problem = HOSTILE_ADDS[what]
    spec = _spec(ipc_dir, "x", **sides)
    with Pinger(running) as pinger, devmgr.Client(running, timeout=60) as client:
        with pytest.raises(devmgr.ControlError) as caught:
            client.add(spec)
        assert caught.value.code == "invalid_spec"
        assert caught.value.message.splitlines() == [problem]
        assert client.ping() == "pong"
    assert pinger.slowest < PING_DEADLINE, f"a ping took {pinger.slowest:.2f} s"


def _devices_toml(folder: Path, count: int) -> str:
    return "".join(
        f'[devices.r{i}]\nkind = "streamer"\nautostart = false\n'
        f'in = {{ type = "PULL", bind = ["ipc://{folder}/r{i}-i"] }}\n'
        f'out = {{ type = "PUSH", bind = ["ipc://{folder}/r{i}-o"] }}\n'
        for i in range(count)
    )


def test_reload_of_3000_devices_and_add_beside_them_keep_pings_answered(
    ipc_dir: Path,
) -> None:
    config = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    endpoint = f"ipc://{ipc_dir}/control"
    with manager_process(config, private_env(ipc_dir)):
        with config.open("a") as f:
            f.write(_devices_toml(ipc_dir, 3000))  # ~540 KiB
        with Pinger(endpoint) as pinger, devmgr.Client(endpoint, timeout=120) as client:
            diff = client.reload()  # read and validated on the loop: ~9 s without pongs
            assert len(diff["added"]) == 3000 and diff["unchanged"] == ["a"]
            # the ping in flight during a stall is measured when its pong comes
            after_reload = pinger.count
            wait_until(lambda: pinger.count >= after_reload + 2, timeout=PING_DEADLINE + 60)
            reloading = pinger.slowest
            # the cross-device check of an `add` re-validated the whole config (~5 s)
            added = client.add(_spec(ipc_dir, "x"))
            assert added["name"] == "x" and added["state"] == "running"
            with pytest.raises(devmgr.ControlError) as caught:
                client.add(_spec(ipc_dir, "y", **{"in": {"bind": [f"ipc://{ipc_dir}/r7-i"]}}))
            assert caught.value.code == "conflict"
            assert "also bound" in caught.value.message and "devices.r7.in.bind[0]" in (
                caught.value.message
            )
            assert len(client.status()["devices"]) == 3002
        assert reloading < PING_DEADLINE, f"a ping took {reloading:.2f} s during the reload"
        assert pinger.slowest < PING_DEADLINE, f"a ping took {pinger.slowest:.2f} s"


def _quadratic_bind_conflicts(binds: list[tuple[Loc, str]]) -> list[Issue]:
    """The check as it was: every bind against every earlier one (the reference)."""
    seen: list[tuple[Loc, str, Any]] = []
    issues: list[Issue] = []
    for loc, endpoint in binds:
        keys = bind_key(endpoint)
        clash = next(
            (
                (other_loc, other_ep)
                for key in keys
                for other_loc, other_ep, other in seen
                if _keys_conflict(key, other)
            ),
            None,
        )
        if clash is not None:
            other_loc, other_ep = clash
            as_other = "" if other_ep == endpoint else f", as {other_ep},"
            issues.append((loc, f"{endpoint} is also bound{as_other} at {{ref}}", other_loc))
        seen.extend((loc, endpoint, key) for key in keys)
    return issues


_bind_endpoints = st.sampled_from(
    ["*", "127.0.0.1", "127.0.0.2", "localhost", "0.0.0.0", "[::1]", "[*]", "[::]"]
).flatmap(lambda host: st.sampled_from([1, 2, 3, 0]).map(lambda port: f"tcp://{host}:{port}")) | (
    st.sampled_from(["/tmp/a", "/tmp/b", "*"]).map(lambda path: f"ipc://{path}")
)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.lists(_bind_endpoints, max_size=12))
def test_linear_bind_conflict_check_says_what_the_quadratic_one_said(
    endpoints: list[str],
) -> None:
    binds: list[tuple[Loc, str]] = [(("bind", i), ep) for i, ep in enumerate(endpoints)]
    assert find_bind_conflicts(binds) == _quadratic_bind_conflicts(binds)
