"""devmgr's device classes: pyzmq's API on devmgr's loop, plus stop/pause/resume/stats."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import zmq
import zmq.devices

import devmgr
from devmgr._devices import STAT_KEYS, parse_stats

from conftest import wait_until

Socket = zmq.Socket[Any]


class Peers:
    """The test's own sockets, in a private context, all with linger=0."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Socket] = zmq.Context()
        self.sockets: list[Socket] = []  # held, so none is collected while still open

    def socket(self, kind: int, connect: str | None = None, **options: Any) -> Socket:
        sock = self.ctx.socket(kind)
        self.sockets.append(sock)
        sock.linger = 0
        sock.rcvtimeo = 5000
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name.upper()), value)
        if connect:
            sock.connect(connect)
        return sock

    def close(self) -> None:
        if not self.ctx.closed:
            self.ctx.destroy(linger=0)


@pytest.fixture
def peers() -> Iterator[Peers]:
    p = Peers()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def instance_context() -> Iterator[None]:
    """Thread devices use zmq.Context.instance(), as pyzmq's do: end it after the test."""
    yield
    ctx = zmq.Context.instance()
    terminator = threading.Thread(target=ctx.term, daemon=True)
    terminator.start()
    terminator.join(10)
    assert not terminator.is_alive(), "a device left the shared context busy"


def no_linger(dev: Any, *sides: str) -> None:
    for side in sides:
        getattr(dev, f"setsockopt_{side}")(zmq.LINGER, 0)


def settle(send_probe: Any, *receivers: Socket) -> None:
    """Probe until every receiver got a probe (connections and subscriptions are up)."""
    pending = set(range(len(receivers)))

    def all_seen() -> bool:
        send_probe()
        for index in list(pending):
            if receivers[index].poll(20):
                pending.discard(index)
        return not pending

    wait_until(all_seen, timeout=10, what="probes to reach every receiver")
    for receiver in receivers:
        while receiver.poll(50):
            receiver.recv_multipart()


def endpoints(ipc_dir: Path, *names: str) -> list[str]:
    return [f"ipc://{ipc_dir}/{name}" for name in names]


# --- monitored queues ----------------------------------------------------------------


def exercise_controls(dev: Any, peers: Peers, ep_in: str, ep_out: str, ep_mon: str) -> None:
    """Traffic, monitor, counters, pause/resume on a running ROUTER/DEALER monitored queue."""
    client = peers.socket(zmq.DEALER, ep_in, routing_id=b"client")
    worker = peers.socket(zmq.DEALER, ep_out)
    tap = peers.socket(zmq.SUB, ep_mon, subscribe=b"")
    assert dev.ping(timeout=10)
    settle(lambda: client.send(b"probe"), worker, tap)
    base = dev.stats(timeout=5)

    client.send_multipart([b"hello", b"world"])
    assert worker.recv_multipart() == [b"client", b"hello", b"world"]
    worker.send_multipart([b"client", b"back"])
    assert client.recv_multipart() == [b"back"]
    assert tap.recv_multipart() == [b"in", b"client", b"hello", b"world"]
    assert tap.recv_multipart() == [b"out", b"client", b"back"]
    counters = dev.stats(timeout=5)
    delta = {key: counters[key] - base[key] for key in STAT_KEYS}
    assert delta == {
        "in_msgs_received": 1,
        "in_bytes_received": 16,
        "in_msgs_sent": 1,
        "in_bytes_sent": 10,
        "out_msgs_received": 1,
        "out_bytes_received": 10,
        "out_msgs_sent": 1,
        "out_bytes_sent": 16,
    }

    dev.pause(timeout=5)
    for i in range(50):
        client.send(b"%d" % i)
    assert not worker.poll(300)
    assert dev.stats(timeout=5)["in_msgs_received"] == counters["in_msgs_received"]
    dev.resume(timeout=5)
    assert [worker.recv_multipart()[1] for _ in range(50)] == [b"%d" % i for i in range(50)]


@pytest.mark.usefixtures("instance_context")
def test_thread_monitored_queue_relays_and_takes_control(peers: Peers, ipc_dir: Path) -> None:
    ep_in, ep_out, ep_mon = endpoints(ipc_dir, "in", "out", "mon")
    dev = devmgr.ThreadMonitoredQueue(zmq.ROUTER, zmq.DEALER)
    dev.bind_in(ep_in)
    dev.bind_out(ep_out)
    dev.bind_mon(ep_mon)
    no_linger(dev, "in", "out", "mon")
    dev.start()
    exercise_controls(dev, peers, ep_in, ep_out, ep_mon)
    dev.stop(timeout=5)
    assert dev.done and not dev.launcher.is_alive()
    dev.stop(timeout=5)  # stopping an ended device is a no-op


def test_process_monitored_queue_is_controlled_from_the_parent(peers: Peers, ipc_dir: Path) -> None:
    ep_in, ep_out, ep_mon = endpoints(ipc_dir, "in", "out", "mon")
    dev = devmgr.ProcessMonitoredQueue(zmq.ROUTER, zmq.DEALER)
    dev.bind_in(ep_in)
    dev.bind_out(ep_out)
    dev.bind_mon(ep_mon)
    no_linger(dev, "in", "out", "mon")
    dev.start()
    try:
        exercise_controls(dev, peers, ep_in, ep_out, ep_mon)
        dev.stop(timeout=10)
        assert dev.launcher.exitcode == 0
        assert dev._ctrl_dir is not None and not os.path.exists(dev._ctrl_dir)
    finally:
        if dev.launcher.is_alive():
            dev.launcher.kill()
            dev.launcher.join()


def test_process_device_child_makes_its_own_context() -> None:
    # pyzmq's rule for forked devices: a fresh Context in the child, never instance()
    assert devmgr.ProcessMonitoredQueue.context_factory is zmq.Context
    assert devmgr.ProcessDevice.context_factory is zmq.Context
    assert devmgr.ThreadMonitoredQueue.context_factory == zmq.Context.instance


def test_sigterm_from_outside_drains_and_exits_zero(peers: Peers, ipc_dir: Path) -> None:
    ep_in, ep_out, ep_mon = endpoints(ipc_dir, "in", "out", "mon")
    dev = devmgr.ProcessMonitoredQueue(zmq.PULL, zmq.PUSH)
    dev.bind_in(ep_in)
    dev.bind_out(ep_out)
    dev.bind_mon(ep_mon)
    no_linger(dev, "in", "mon")
    dev.start()
    try:
        producer = peers.socket(zmq.PUSH, ep_in)
        consumer = peers.socket(zmq.PULL, ep_out)
        assert dev.ping(timeout=10)
        received = 0
        for batch in range(10):
            while batch * 1000 - received > 3000 and consumer.poll(3000):
                assert consumer.recv() == b"%d" % received
                received += 1
            for i in range(1000):
                producer.send(b"%d" % (batch * 1000 + i))
        pid = dev.launcher.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)  # mid-traffic
        while consumer.poll(1000):  # what the device forwarded arrives whole and in order
            assert consumer.recv() == b"%d" % received
            received += 1
        dev.join(10)
        assert dev.launcher.exitcode == 0
        assert received > 0
    finally:
        if dev.launcher.is_alive():
            dev.launcher.kill()
            dev.launcher.join()


def test_stop_drains_what_the_device_has_read(peers: Peers, ipc_dir: Path) -> None:
    ep_in, ep_out = endpoints(ipc_dir, "in", "out")
    dev = devmgr.ProcessDevice(zmq.STREAMER, zmq.PULL, zmq.PUSH)
    dev.bind_in(ep_in)
    dev.bind_out(ep_out)
    dev.setsockopt_out(zmq.SNDHWM, 2)
    no_linger(dev, "in")
    dev.drain_timeout = 10.0
    dev.start()
    size = 256 * 1024  # big messages fill the kernel's buffers quickly
    try:
        producer = peers.socket(zmq.PUSH, ep_in)
        consumer = peers.socket(zmq.PULL, ep_out, rcvhwm=2)
        assert dev.ping(timeout=10)
        for i in range(30):
            producer.send(b"%04d" % i + b"x" * (size - 4))

        def holding() -> bool:
            counters = dev.stats(timeout=5)
            return counters["in_msgs_received"] == counters["out_msgs_sent"] + 1

        wait_until(holding, timeout=10, what="the device to hold a message for its output")
        read_by_device = dev.stats(timeout=5)["in_msgs_received"]
        stopper = threading.Thread(target=dev.stop, kwargs={"timeout": 20})
        stopper.start()
        got = []
        while consumer.poll(2000):
            got.append(consumer.recv())
        stopper.join(20)
        assert not stopper.is_alive()
        assert dev.launcher.exitcode == 0
        assert len(got) >= read_by_device
        assert [m[:4] for m in got] == [b"%04d" % i for i in range(len(got))]
        assert all(len(m) == size for m in got)
    finally:
        if dev.launcher.is_alive():
            dev.launcher.kill()
            dev.launcher.join()


def test_foreground_monitored_queue_is_stopped_from_another_thread(
    peers: Peers, ipc_dir: Path
) -> None:
    ep_in, ep_out, ep_mon = endpoints(ipc_dir, "in", "out", "mon")
    dev = devmgr.MonitoredQueue(zmq.PULL, zmq.PUSH, zmq.PUB, b"<", b">")
    dev.context_factory = zmq.Context  # a private context, ended below
    dev.bind_in(ep_in)
    dev.bind_out(ep_out)
    dev.bind_mon(ep_mon)
    no_linger(dev, "in", "out", "mon")
    outcome: list[object] = []

    def drive() -> None:
        try:
            producer = peers.socket(zmq.PUSH, ep_in)
            consumer = peers.socket(zmq.PULL, ep_out)
            # start() runs in the main thread: wait for it to have begun, then for the loop
            wait_until(lambda: dev._ctrl_endpoint, timeout=10, what="start() to begin")
            assert dev.ping(timeout=10)
            producer.send(b"through")
            outcome.append(consumer.recv())
            dev.stop(timeout=5)
        except BaseException as exc:
            outcome.append(exc)
            raise

    driver = threading.Thread(target=drive)
    driver.start()
    dev.start()  # blocks in this (main) thread until stop()
    driver.join(10)
    dev._context.term()
    assert outcome == [b"through"]
    assert signal.set_wakeup_fd(-1) == -1  # the loop's wakeup fd was handed back


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_foreground_device_keeps_running_when_the_handler_lets_it(
    peers: Peers, ipc_dir: Path, signame: str
) -> None:
    signum = getattr(signal, signame)
    handled: list[int] = []
    previous = signal.signal(signum, lambda received, frame: handled.append(received))
    ep_in, ep_out = endpoints(ipc_dir, "in", "out")
    dev = devmgr.Device(zmq.STREAMER, zmq.PULL, zmq.PUSH)
    dev.context_factory = zmq.Context  # a private context, ended below
    dev.bind_in(ep_in)
    dev.bind_out(ep_out)
    no_linger(dev, "in", "out")
    outcome: list[object] = []

    def drive() -> None:
        try:
            producer = peers.socket(zmq.PUSH, ep_in)
            consumer = peers.socket(zmq.PULL, ep_out)
            wait_until(lambda: dev._ctrl_endpoint, timeout=10, what="start() to begin")
            assert dev.ping(timeout=10)
            os.kill(os.getpid(), signum)
            wait_until(lambda: handled, timeout=5, what="the user's handler to run")
            # the handler returned: the device is still there and still relaying
            assert dev.ping(timeout=5)
            producer.send(b"after the signal")
            outcome.append(consumer.recv())
            dev.stop(timeout=5)
        except BaseException as exc:
            outcome.append(exc)
            raise

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        dev.start()  # blocks in this (main) thread until stop()
    finally:
        driver.join(20)
        signal.signal(signum, previous)
        dev._context.term()
    assert outcome == [b"after the signal"]
    assert handled == [signum]


def test_a_process_device_child_hands_back_the_wakeup_fd_it_took_over() -> None:
    from devmgr._devices import _SignalWakeup

    ours_r, ours_w = socket.socketpair()
    try:
        ours_w.setblocking(False)
        assert signal.set_wakeup_fd(ours_w.fileno()) == -1
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        # a process device's child takes over a wakeup fd inherited from its parent
        with _SignalWakeup(drain_on_term=True) as loop_fd:
            assert loop_fd >= 0 and loop_fd != ours_r.fileno()
            device_w = signal.set_wakeup_fd(ours_w.fileno())  # a peek...
            signal.set_wakeup_fd(device_w)  # ...undone
            assert device_w not in (-1, ours_w.fileno())
        assert signal.set_wakeup_fd(-1) == ours_w.fileno()  # ours again
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    finally:
        signal.set_wakeup_fd(-1)
        ours_r.close()
        ours_w.close()


# --- switching from pyzmq --------------------------------------------------------------


@pytest.mark.usefixtures("instance_context")
@pytest.mark.parametrize("module", [zmq.devices, devmgr], ids=["pyzmq", "devmgr"])
def test_switching_from_pyzmq_is_an_import_change(peers: Peers, module: ModuleType) -> None:
    dev = module.ThreadMonitoredQueue(zmq.ROUTER, zmq.DEALER, zmq.PUB, b"req", b"rep")
    port_in = dev.bind_in_to_random_port("tcp://127.0.0.1")
    port_out = dev.bind_out_to_random_port("tcp://127.0.0.1")
    port_mon = dev.bind_mon_to_random_port("tcp://127.0.0.1")
    dev.setsockopt_in(zmq.LINGER, 0)
    dev.setsockopt_out(zmq.LINGER, 0)
    dev.setsockopt_mon(zmq.LINGER, 0)
    dev.daemon = True
    dev.start()
    client = peers.socket(zmq.DEALER, f"tcp://127.0.0.1:{port_in}", routing_id=b"c")
    worker = peers.socket(zmq.DEALER, f"tcp://127.0.0.1:{port_out}")
    tap = peers.socket(zmq.SUB, f"tcp://127.0.0.1:{port_mon}", subscribe=b"")
    settle(lambda: client.send(b"probe"), worker, tap)
    client.send(b"ask")
    asked = worker.recv_multipart()
    worker.send_multipart([b"c", b"answer"])
    answered = client.recv_multipart()
    seen = [tap.recv_multipart(), tap.recv_multipart()]
    assert (asked, answered, seen) == (
        [b"c", b"ask"],
        [b"answer"],
        [[b"req", b"c", b"ask"], [b"rep", b"c", b"answer"]],
    )
    assert isinstance(dev, zmq.devices.ThreadMonitoredQueue)
    # pyzmq's own way to end a thread device (devmgr's also has stop()): end the context
    peers.close()
    zmq.Context.instance().term()
    dev.join(5)
    assert not dev.launcher.is_alive()


@pytest.mark.usefixtures("instance_context")
@pytest.mark.parametrize("module", [zmq.devices, devmgr], ids=["pyzmq", "devmgr"])
@pytest.mark.parametrize("variant", ["ThreadDevice", "ThreadMonitoredQueue"])
def test_router_to_router_swaps_identities_only_in_a_monitored_queue(
    peers: Peers, ipc_dir: Path, module: ModuleType, variant: str
) -> None:
    ep_in, ep_out = endpoints(ipc_dir, "in", "out")
    if variant == "ThreadDevice":  # pyzmq runs zmq.proxy: frames pass as they are
        dev = module.ThreadDevice(zmq.QUEUE, zmq.ROUTER, zmq.ROUTER)
    else:  # pyzmq runs monitored_queue: the two identity frames are swapped
        dev = module.ThreadMonitoredQueue(zmq.ROUTER, zmq.ROUTER)
        dev.setsockopt_mon(zmq.LINGER, 0)
    dev.bind_in(ep_in)
    dev.bind_out(ep_out)
    no_linger(dev, "in", "out")
    dev.daemon = True
    dev.start()
    client = peers.socket(zmq.DEALER, ep_in, routing_id=b"c")
    out_peers = {name: peers.socket(zmq.DEALER, ep_out, routing_id=name) for name in (b"c", b"w")}
    # [b"c", b"w", ...] arrives on the in-socket; the out-socket routes by the first frame
    addressee, expected = (b"c", [b"w", b"req"])
    if variant == "ThreadMonitoredQueue":
        addressee, expected = (b"w", [b"c", b"req"])
    settle(lambda: client.send_multipart([b"w", b"probe"]), out_peers[addressee])
    client.send_multipart([b"w", b"req"])
    assert out_peers[addressee].recv_multipart() == expected
    assert not any(sock.poll(100) for sock in out_peers.values())
    peers.close()
    zmq.Context.instance().term()  # pyzmq's way to end a thread device
    dev.join(5)
    assert not dev.launcher.is_alive()


@pytest.mark.parametrize(
    "name",
    [
        "Device",
        "ThreadDevice",
        "ProcessDevice",
        "MonitoredQueue",
        "ThreadMonitoredQueue",
        "ProcessMonitoredQueue",
    ],
)
def test_every_pyzmq_method_is_there(name: str) -> None:
    ours, theirs = getattr(devmgr, name), getattr(zmq.devices, name)
    assert issubclass(ours, theirs)
    public = {n for n in dir(theirs) if not n.startswith("_")}
    assert public <= set(dir(ours))
    for extra in ("stop", "pause", "resume", "stats"):
        assert callable(getattr(ours, extra))


@pytest.mark.parametrize(
    "cls", [devmgr.MonitoredQueue, devmgr.ThreadMonitoredQueue, devmgr.ProcessMonitoredQueue]
)
def test_str_prefixes_are_refused_at_construction(cls: type) -> None:
    with pytest.raises(TypeError):
        cls(zmq.ROUTER, zmq.DEALER, zmq.PUB, "in", b"out")
    with pytest.raises(TypeError):
        cls(zmq.ROUTER, zmq.DEALER, zmq.PUB, b"in", "out")


def test_control_before_start_is_an_error() -> None:
    dev = devmgr.ThreadMonitoredQueue(zmq.ROUTER, zmq.DEALER)
    for call in (dev.pause, dev.resume, dev.stats, dev.stop):
        with pytest.raises(RuntimeError):
            call()


# --- the plain kinds -----------------------------------------------------------------


@pytest.mark.parametrize("launch", ["ThreadDevice", "ProcessDevice"])
@pytest.mark.parametrize(
    ("kind", "in_type", "out_type", "sender", "receiver"),
    [
        (zmq.QUEUE, zmq.ROUTER, zmq.DEALER, zmq.DEALER, zmq.DEALER),
        (zmq.FORWARDER, zmq.SUB, zmq.PUB, zmq.PUB, zmq.SUB),
        (zmq.STREAMER, zmq.PULL, zmq.PUSH, zmq.PUSH, zmq.PULL),
    ],
    ids=["queue", "forwarder", "streamer"],
)
@pytest.mark.usefixtures("instance_context")
def test_plain_kinds_relay_in_to_out(  # noqa: PLR0917  (pytest parameters)
    peers: Peers,
    ipc_dir: Path,
    launch: str,
    kind: int,
    in_type: int,
    out_type: int,
    sender: int,
    receiver: int,
) -> None:
    ep_in, ep_out = endpoints(ipc_dir, "in", "out")
    dev = getattr(devmgr, launch)(kind, in_type, out_type)
    dev.bind_in(ep_in)
    dev.bind_out(ep_out)
    no_linger(dev, "in", "out")
    dev.start()
    try:
        source = peers.socket(sender, ep_in)
        sink = peers.socket(receiver, ep_out, **({"subscribe": b""} if receiver == zmq.SUB else {}))
        # a FORWARDER's SUB input subscribes to everything by itself
        settle(lambda: source.send(b"probe"), sink)
        source.send_multipart([b"one", b"two"])
        frames = sink.recv_multipart()
        assert frames[-2:] == [b"one", b"two"]
        if kind == zmq.QUEUE:  # and replies come back
            sink.send_multipart([frames[0], b"reply"])
            assert source.recv_multipart() == [b"reply"]
        counters = dev.stats(timeout=5)
        assert counters["out_msgs_sent"] == counters["in_msgs_received"] >= 2
        dev.stop(timeout=10)
        if launch == "ProcessDevice":
            assert dev.launcher.exitcode == 0
    finally:
        if launch == "ProcessDevice" and dev.launcher.is_alive():
            dev.launcher.kill()
            dev.launcher.join()


@pytest.mark.usefixtures("instance_context")
def test_forwarder_keeps_a_subscription_the_user_set(peers: Peers, ipc_dir: Path) -> None:
    ep_in, ep_out = endpoints(ipc_dir, "in", "out")
    dev = devmgr.ThreadDevice(zmq.FORWARDER, zmq.SUB, zmq.PUB)
    dev.bind_in(ep_in)
    dev.bind_out(ep_out)
    dev.setsockopt_in(zmq.SUBSCRIBE, b"keep")
    no_linger(dev, "in", "out")
    dev.start()
    source = peers.socket(zmq.PUB, ep_in)
    sink = peers.socket(zmq.SUB, ep_out, subscribe=b"")
    settle(lambda: source.send(b"keep-probe"), sink)
    source.send(b"drop this")
    source.send(b"keep this")
    assert sink.recv() == b"keep this"
    dev.stop(timeout=5)


def test_a_process_device_that_cannot_bind_ends_and_stop_returns(
    peers: Peers, ipc_dir: Path
) -> None:
    taken = peers.socket(zmq.PULL)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    dev = devmgr.ProcessDevice(zmq.STREAMER, zmq.PULL, zmq.PUSH)
    dev.bind_in(f"tcp://127.0.0.1:{port}")  # already in use
    dev.bind_out(f"ipc://{ipc_dir}/out")
    started = time.monotonic()
    dev.start()
    try:
        dev.stop(timeout=10)
        assert dev.launcher.exitcode not in (None, 0)
        assert time.monotonic() - started < 10
    finally:
        if dev.launcher.is_alive():
            dev.launcher.kill()
            dev.launcher.join()


_ABANDON_DEVICES = """
import os, signal, sys
import zmq
import devmgr

folder = sys.argv[1]
devices = []
for kind, name in ((devmgr.ThreadDevice, "thread"), (devmgr.ProcessDevice, "process")):
    dev = kind(zmq.STREAMER, zmq.PULL, zmq.PUSH)
    dev.bind_in(f"ipc://{folder}/{name}-in")
    dev.bind_out(f"ipc://{folder}/{name}-out")
    dev.setsockopt_in(zmq.LINGER, 0)
    dev.setsockopt_out(zmq.LINGER, 0)
    dev.daemon = True
    dev.start()
    assert dev.ping(timeout=10)
    devices.append(dev)
os.kill(devices[1].launcher.pid, signal.SIGKILL)  # killed, and never joined
print(" ".join(dev._ctrl_dir for dev in devices), flush=True)
# exit without stop(): the daemon thread device is still running
"""


def test_control_folders_go_when_devices_are_abandoned(ipc_dir: Path) -> None:
    env = dict(os.environ, TMPDIR=str(ipc_dir))  # control folders made under ipc_dir
    done = subprocess.run(
        [sys.executable, "-c", _ABANDON_DEVICES, str(ipc_dir)],
        env=env,
        cwd=ipc_dir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    folders = done.stdout.split()
    assert len(folders) == 2 and all(f.startswith(str(ipc_dir)) for f in folders)
    assert [f for f in folders if os.path.exists(f)] == []


def test_parse_stats() -> None:
    frames = [struct.pack("=Q", i) for i in range(8)]
    assert parse_stats(frames) == dict(zip(STAT_KEYS, range(8), strict=True))
    with pytest.raises(ValueError):
        parse_stats([b"ERROR"])
    with pytest.raises(ValueError):
        parse_stats(frames[:7])
