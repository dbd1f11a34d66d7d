"""Hypothesis fuzz of the control socket of one running `devmgr start` manager.

Every generated message (random frame counts and bytes, JSON of wrong shapes, requests
with ill-typed fields, sizes around the 1 MiB limit, clients that vanish before their
reply) must get exactly one well-formed reply (or none, for a client that left), and
afterwards the manager still answers `ping` and holds no more file descriptors than
before.

The default run sends about 350 inputs (~3 s); the slow one
(`pytest -m slow tests/test_control_fuzz.py`) sends at least 10,000 within ~60 s (most
of it is Hypothesis drawing the inputs, ~3 ms each here; the manager's CPU is ~5%).
Each test counts what it sent and asserts the count.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from ctl_support import manager_process, private_env, streamer, write_config
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import wait_until

COMMANDS = [
    "ping",
    "version",
    "status",
    "start",
    "stop",
    "restart",
    "pause",
    "resume",
    "stats",
    "add",
    "remove",
    "reload",
]  # all but shutdown, which would end the run
REPLY_TIMEOUT_MS = 15_000

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
# Never the device's name nor "*": the fuzz is about malformed input, and a device
# stopped or restarted by a lucky draw would change the fd count it checks.
names = (st.sampled_from(["nope", "", "x" * 300]) | st.text(max_size=6)).filter(
    lambda n: n not in ("a", "*")
)
args = (
    st.fixed_dictionaries({}, optional={"name": names | json_values})
    | st.fixed_dictionaries({}, optional={"names": st.lists(names, max_size=3) | json_values})
    | st.fixed_dictionaries({"spec": st.dictionaries(st.text(max_size=6), json_values, max_size=4)})
    | json_values
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 1, 1, 0, 2, "1", None, 1.0, True]),
        "id": json_values,
        "cmd": st.sampled_from(COMMANDS) | st.text(max_size=10) | json_values,
        "args": args,
        "extra": json_values,
    },
)


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


# built once: making megabytes per draw would dominate the run time
BIG_FRAMES = [
    b"{" + b" " * (size - 2) + b"}" for size in (1 << 16, (1 << 20) - 64, (1 << 20) + 1, 1 << 21)
]
big_frames = st.sampled_from(BIG_FRAMES)
frames_of_request = st.one_of(
    requests.map(lambda r: [_encode(r)]),  # well-framed, odd content
    json_values.map(lambda v: [_encode(v)]),  # JSON, not an object
    st.lists(st.binary(max_size=64), min_size=1, max_size=5),  # random frames
    st.lists(requests.map(_encode) | st.just(b""), min_size=2, max_size=4),  # extra frames
    st.binary(max_size=300).map(lambda b: [b]),
    big_frames.map(lambda b: [b]),
)
messages = st.tuples(frames_of_request, st.integers(0, 19))  # (frames, 0 = vanish)


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


@dataclass
class Fuzzer:
    """A few client sockets that send generated messages and check each reply."""

    endpoint: str
    ctx: zmq.Context[Any] = field(default_factory=zmq.Context)
    sent: int = 0
    sockets: dict[int, zmq.Socket[bytes]] = field(default_factory=dict)

    def socket_of(self, kind: int) -> zmq.Socket[bytes]:
        sock = self.sockets.get(kind)
        if sock is None:
            sock = self.ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self.sockets[kind] = sock
        return sock

    def vanish(self, kind: int) -> None:
        self.sockets.pop(kind).close(linger=0)

    def send(self, frames: list[bytes], stay: bool, kind: int) -> None:
        sock = self.socket_of(kind)
        sock.send_multipart(frames)
        self.sent += 1
        if not stay:  # a client that leaves before its reply
            self.vanish(kind)
            return
        assert sock.poll(REPLY_TIMEOUT_MS), f"no reply to {frames[:3]!r}"
        reply_frames = sock.recv_multipart()
        if kind == zmq.DEALER and frames[0] == b"":
            assert reply_frames[0] == b"", reply_frames  # the delimiter comes back
            reply_frames = reply_frames[1:]
        assert len(reply_frames) == 1, reply_frames
        reply = json.loads(reply_frames[0])
        assert reply["v"] == 1 and isinstance(reply["ok"], bool), reply
        if not reply["ok"]:
            assert set(reply) == {"v", "id", "ok", "error"}
            assert reply["error"]["code"] in {
                "bad_request",
                "unknown_command",
                "unknown_device",
                "invalid_spec",
                "conflict",
                "too_large",
            }, reply  # never `internal`: that would be a bug
            assert "Traceback" not in reply["error"]["message"]
        if sum(map(len, frames)) > (1 << 20) + 64:
            assert not reply["ok"] and reply["error"]["code"] in ("too_large", "bad_request")

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()
        self.ctx.term()


@pytest.fixture
def manager(ipc_dir: Path) -> Iterator[tuple[str, psutil.Process]]:
    """One `devmgr start` subprocess with one device, for the whole fuzz run."""
    config = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    with manager_process(config, private_env(ipc_dir)) as proc:
        yield f"ipc://{ipc_dir}/control", psutil.Process(proc.pid)


def fd_table(pid: int) -> dict[int, str]:
    """Return fd -> what it is (for a failure message that says which fd is new)."""
    with open("/proc/net/unix") as f:  # inode -> path of unix sockets
        paths = {p[6]: p[7] for p in (line.split() for line in f) if len(p) > 7}
    table = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            what = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        inode = what[len("socket:[") : -1] if what.startswith("socket:[") else ""
        table[int(fd)] = f"{what} {paths[inode]}" if inode in paths else what
    return table


def fds_settled(process: psutil.Process, baseline: dict[int, str]) -> bool:
    now = fd_table(process.pid)
    assert len(now) <= len(baseline), (
        f"the manager holds {len(now)} fds, {len(baseline)} before the fuzz; "
        f"new: {sorted(set(now.items()) - set(baseline.items()))}, "
        f"gone: {sorted(set(baseline.items()) - set(now.items()))}"
    )
    return True


def settled_fd_table(endpoint: str, process: psutil.Process) -> dict[int, str]:
    """Return the manager's fds once its start-up connections are all made.

    `devmgr start` answers `ping` while its device is still starting; the device's own
    control connection to the manager exists once the device is `running`. The largest
    of a few samples covers psutil's transient /proc reads in the manager's health tick.
    """
    from devmgr import Client

    with Client(endpoint) as client:
        wait_until(
            lambda: client.status()["devices"][0]["state"] == "running",
            what="the device to run",
        )
    return max((fd_table(process.pid) for _ in range(5)), key=len)


def run_fuzz(endpoint: str, process: psutil.Process, examples: int, minimum: int) -> None:
    baseline = settled_fd_table(endpoint, process)
    from devmgr import Client

    with Client(endpoint) as client:
        device_pid = client.status()["devices"][0]["pid"]
    fuzzer = Fuzzer(endpoint)
    kinds = st.sampled_from([zmq.DEALER, zmq.DEALER, zmq.REQ])

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(st.tuples(messages, kinds), min_size=6, max_size=16))
    def fuzz(batch: list[tuple[tuple[list[bytes], int], int]]) -> None:
        for (frames, stay), kind in batch:
            fuzzer.send(frames, bool(stay), kind)

    try:
        fuzz()
    finally:
        fuzzer.close()
    print(f"fuzz: {fuzzer.sent} inputs in {examples} examples")  # shown with pytest -s
    assert fuzzer.sent >= minimum, fuzzer.sent

    assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    from devmgr import Client

    with Client(endpoint) as client:
        assert client.ping() == "pong"
        (device,) = client.status()["devices"]
    # nothing the fuzz sent touched the device: same process, never restarted
    assert (device["name"], device["state"], device["pid"]) == ("a", "running", device_pid)
    assert device["restarts"] == 0 and device["last_exit"] is None, device
    wait_until(lambda: fds_settled(process, baseline), timeout=10, what="fds back to baseline")


def test_fuzz_control_socket(manager: tuple[str, psutil.Process]) -> None:
    """About 350 inputs; the slow variant below sends 10,000 or more."""
    endpoint, process = manager
    run_fuzz(endpoint, process, examples=40, minimum=300)


@pytest.mark.slow
@pytest.mark.timeout(180)  # ~30 s on an idle 2-core machine, ~60 s under heavy load
def test_fuzz_control_socket_10k(manager: tuple[str, psutil.Process]) -> None:
    """At least 10,000 generated inputs against one manager (~60 s)."""
    endpoint, process = manager
    run_fuzz(endpoint, process, examples=1_250, minimum=10_000)


def test_garbage_below_zmtp(manager: tuple[str, psutil.Process], ipc_dir: Path) -> None:
    """Bytes that are not even ZMTP cost the manager nothing either."""
    endpoint, process = manager
    path = endpoint[len("ipc://") :]
    baseline = settled_fd_table(endpoint, process)
    samples = [b"", b"\xff" * 64, b"GET / HTTP/1.0\r\n\r\n", os.urandom(4096)]
    samples.append(b"\xff" + b"\0" * 8 + b"\x7f\x03\x00NULL" + b"\0" * 48 + b"\x04\xff" * 100)
    for data in samples * 5:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(path)
            if data:
                try:
                    raw.sendall(data)
                except OSError:
                    pass
    from devmgr import Client

    with Client(endpoint) as client:
        assert client.ping() == "pong"
    wait_until(lambda: fds_settled(process, baseline), timeout=10, what="fds back")
