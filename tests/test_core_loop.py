"""The forwarding loop (devmgr._core.proxy / devmgr.monitored_queue) with real sockets.

Semantics tests run against pyzmq's monitored_queue too where it can take part, so the
drop-in claim is checked rather than assumed.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
import zmq.devices

from devmgr import _core
from devmgr._devices import STAT_KEYS, monitored_queue, parse_stats

from conftest import wait_until

Socket = zmq.Socket[Any]
MonitoredQueueFn = Callable[..., Any]
IMPLEMENTATIONS: dict[str, MonitoredQueueFn] = {
    "devmgr": monitored_queue,
    "pyzmq": zmq.devices.monitored_queue,
}


class LoopThread:
    """Run a loop function in a thread and remember how it ended."""

    def __init__(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.error: BaseException | None = None
        self.returned = False
        self._target = target
        self.thread = threading.Thread(target=self._run, args=args, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, *args: Any, **kwargs: Any) -> None:
        try:
            self._target(*args, **kwargs)
            self.returned = True
        except BaseException as exc:  # recorded for the test to inspect
            self.error = exc

    def join(self, timeout: float = 5.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the loop did not end"


class Harness:
    """One context for a test: sockets with linger=0, loops in threads, clean teardown."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Socket] = zmq.Context()
        self.sockets: list[Socket] = []
        self.loops: list[LoopThread] = []
        self._names = 0

    def socket(self, kind: int, **options: Any) -> Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.rcvtimeo = 5000
        sock.sndtimeo = 5000
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name.upper()), value)
        self.sockets.append(sock)
        return sock

    def endpoint(self) -> str:
        self._names += 1
        return f"inproc://ep{self._names}"

    def pair(
        self, kind: int, peer: int, peer_options: dict[str, Any] | None = None, **options: Any
    ) -> tuple[Socket, Socket]:
        """A bound socket for the device and a connected peer (options set before both)."""
        endpoint = self.endpoint()
        device_side = self.socket(kind, **options)
        device_side.bind(endpoint)
        peer_side = self.socket(peer, **(peer_options or {}))
        peer_side.connect(endpoint)
        return device_side, peer_side

    def run(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> LoopThread:
        loop = LoopThread(target, *args, **kwargs)
        self.loops.append(loop)
        return loop

    def close(self) -> None:
        # ETERM ends every loop still running (pyzmq's included); then close and finish.
        terminator = threading.Thread(target=self.ctx.term, daemon=True)
        terminator.start()
        for loop in self.loops:
            loop.thread.join(5)
        for sock in self.sockets:
            sock.close(linger=0)
        terminator.join(5)
        assert not terminator.is_alive(), "context termination hung"


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


def command(ctrl: Socket, *frames: bytes) -> list[bytes]:
    """Send one control request and return its reply."""
    ctrl.send_multipart(list(frames))
    assert ctrl.poll(5000), f"no reply to {frames!r}"
    return ctrl.recv_multipart()


def stats(ctrl: Socket) -> dict[str, int]:
    return parse_stats(command(ctrl, b"STATISTICS"))


def subscribed_monitor(h: Harness, mon: Socket, topic: bytes = b"") -> Socket:
    sub = h.socket(zmq.SUB)
    sub.subscribe(topic)
    sub.connect(mon.getsockopt_string(zmq.LAST_ENDPOINT))
    return sub


def settle(send_probe: Callable[[], None], *receivers: Socket) -> None:
    """Send probes until every receiver got one (routes and subscriptions are up).

    Then swallow the probes, so that the test proper starts from empty queues.
    """
    pending = set(range(len(receivers)))

    def all_seen() -> bool:
        send_probe()
        for index in list(pending):
            if receivers[index].poll(20):
                pending.discard(index)
        return not pending

    wait_until(all_seen, timeout=5, what="probes to reach every receiver")
    for receiver in receivers:
        while receiver.poll(50):
            receiver.recv_multipart()


# --- relaying and the monitor --------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_queue_relays_both_ways_and_monitor_gets_prefix_then_message(h: Harness, impl: str) -> None:
    ins, client = h.pair(zmq.ROUTER, zmq.DEALER)
    outs, worker = h.pair(zmq.DEALER, zmq.DEALER)
    mon = h.socket(zmq.PUB)
    mon.bind(h.endpoint())
    sub = subscribed_monitor(h, mon)
    h.run(IMPLEMENTATIONS[impl], ins, outs, mon)
    settle(lambda: client.send(b"probe"), worker, sub)
    client.send_multipart([b"req", b"part2"])
    request = worker.recv_multipart()
    assert request[1:] == [b"req", b"part2"]
    identity = request[0]
    assert sub.recv_multipart() == [b"in", identity, b"req", b"part2"]
    worker.send_multipart([identity, b"rep"])
    assert client.recv_multipart() == [b"rep"]
    assert sub.recv_multipart() == [b"out", identity, b"rep"]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_order_is_kept_in_both_directions(h: Harness, impl: str) -> None:
    ins, left = h.pair(zmq.DEALER, zmq.DEALER)
    outs, right = h.pair(zmq.DEALER, zmq.DEALER)
    mon = h.socket(zmq.PUB)
    h.run(IMPLEMENTATIONS[impl], ins, outs, mon)
    count = 2000
    for i in range(count):
        left.send(b"L%d" % i)
        right.send(b"R%d" % i)
    assert [right.recv() for _ in range(count)] == [b"L%d" % i for i in range(count)]
    assert [left.recv() for _ in range(count)] == [b"R%d" % i for i in range(count)]


def test_default_and_custom_prefixes(h: Harness) -> None:
    for prefixes, expected in (((), (b"in", b"out")), ((b"IN>", b""), (b"IN>", b""))):
        ins, left = h.pair(zmq.DEALER, zmq.DEALER)
        outs, right = h.pair(zmq.DEALER, zmq.DEALER)
        mon = h.socket(zmq.PUB)
        mon.bind(h.endpoint())
        sub = subscribed_monitor(h, mon)
        ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
        loop = h.run(monitored_queue, ins, outs, mon, *prefixes, ctrl_socket=ctrl)
        settle(lambda left=left: left.send(b"probe"), right, sub)
        left.send(b"to-right")
        right.recv()
        right.send(b"to-left")
        left.recv()
        assert sub.recv_multipart() == [expected[0], b"to-right"]
        assert sub.recv_multipart() == [expected[1], b"to-left"]
        assert command(control, b"TERMINATE") == [b"OK"]
        loop.join()


def test_monitor_subscriber_filters_by_prefix(h: Harness) -> None:
    ins, left = h.pair(zmq.DEALER, zmq.DEALER)
    outs, right = h.pair(zmq.DEALER, zmq.DEALER)
    mon = h.socket(zmq.PUB)
    mon.bind(h.endpoint())
    sub = subscribed_monitor(h, mon, topic=b"out")
    h.run(monitored_queue, ins, outs, mon)
    settle(lambda: right.send(b"probe"), left, sub)
    for i in range(5):
        left.send(b"in-%d" % i)
        right.send(b"out-%d" % i)
    for _ in range(5):
        right.recv()
        left.recv()
    # PUB keeps order, so in-direction copies (had they passed) would come first
    assert [sub.recv_multipart() for _ in range(5)] == [[b"out", b"out-%d" % i] for i in range(5)]
    assert not sub.poll(100)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_router_to_router_swaps_identities_with_dealer_peers(h: Harness, impl: str) -> None:
    ins = h.socket(zmq.ROUTER)
    outs = h.socket(zmq.ROUTER)
    ins.bind("inproc://front")
    outs.bind("inproc://back")
    client = h.socket(zmq.DEALER, routing_id=b"client")
    worker = h.socket(zmq.DEALER, routing_id=b"worker")
    client.connect("inproc://front")
    worker.connect("inproc://back")
    mon = h.socket(zmq.PUB)
    mon.bind(h.endpoint())
    sub = subscribed_monitor(h, mon)
    h.run(IMPLEMENTATIONS[impl], ins, outs, mon)
    # a ROUTER drops what it cannot route yet: probe until the route and the
    # subscription are both in place
    settle(lambda: client.send_multipart([b"worker", b"probe"]), worker, sub)
    client.send_multipart([b"worker", b"request"])
    assert worker.recv_multipart() == [b"client", b"request"]
    worker.send_multipart([b"client", b"reply"])
    assert client.recv_multipart() == [b"worker", b"reply"]
    # as pyzmq: the monitor shows the frames in the order they were sent on
    assert sub.recv_multipart() == [b"in", b"worker", b"client", b"request"]
    assert sub.recv_multipart() == [b"out", b"client", b"worker", b"reply"]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("which", ["in_prefix", "out_prefix"])
def test_str_prefix_is_a_type_error(h: Harness, impl: str, which: str) -> None:
    ins, _ = h.pair(zmq.DEALER, zmq.DEALER)
    outs, _ = h.pair(zmq.DEALER, zmq.DEALER)
    mon = h.socket(zmq.PUB)
    with pytest.raises(TypeError):
        IMPLEMENTATIONS[impl](ins, outs, mon, **{which: "text"})


def test_without_monitor_is_a_plain_proxy(h: Harness) -> None:
    ins, producer = h.pair(zmq.PULL, zmq.PUSH)
    outs, consumer = h.pair(zmq.PUSH, zmq.PULL)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    loop = h.run(_core.proxy, ins, outs, None, ctrl)
    producer.send_multipart([b"a", b"b"])
    assert consumer.recv_multipart() == [b"a", b"b"]
    assert command(control, b"TERMINATE") == [b"OK"]
    loop.join()
    assert loop.returned and loop.error is None


@pytest.mark.parametrize("closed", ["in", "out", "mon", "ctrl"])
def test_a_closed_socket_raises_enotsock_as_pyzmq(h: Harness, closed: str) -> None:
    sockets = {
        "in": h.socket(zmq.PULL),
        "out": h.socket(zmq.PUSH),
        "mon": h.socket(zmq.PUB),
        "ctrl": h.socket(zmq.PAIR),
    }
    sockets[closed].close()
    with pytest.raises(zmq.ZMQError) as raised:
        _core.proxy(sockets["in"], sockets["out"], sockets["mon"], sockets["ctrl"])
    assert raised.value.errno == zmq.ENOTSOCK
    with pytest.raises(zmq.ZMQError) as by_pyzmq:  # what pyzmq raises on a closed socket
        sockets[closed].send(b"x")
    assert by_pyzmq.value.errno == zmq.ENOTSOCK


def test_socket_types_with_nothing_to_relay_are_refused(h: Harness) -> None:
    with pytest.raises(ValueError):
        _core.proxy(h.socket(zmq.PUB), h.socket(zmq.PUSH))  # neither can receive


def test_one_socket_for_both_sides_echoes(h: Harness) -> None:
    # pyzmq's Device with out_type < 0 passes the same socket twice
    sock, peer = h.pair(zmq.DEALER, zmq.DEALER)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    loop = h.run(_core.proxy, sock, sock, None, ctrl)
    peer.send_multipart([b"echo", b"me"])
    assert peer.recv_multipart() == [b"echo", b"me"]
    assert command(control, b"TERMINATE") == [b"OK"]
    loop.join()


def test_xpub_xsub_forwarder_carries_subscriptions_out_to_in(h: Harness) -> None:
    ins, publisher = h.pair(zmq.XSUB, zmq.PUB)
    outs, subscriber = h.pair(zmq.XPUB, zmq.SUB)
    mon = h.socket(zmq.PUB)
    mon.bind(h.endpoint())
    spy = subscribed_monitor(h, mon, topic=b"out")
    h.run(monitored_queue, ins, outs, mon)
    subscriber.subscribe(b"news")
    # the subscription travels out -> in and shows on the monitor with the out prefix
    assert spy.recv_multipart() == [b"out", b"\x01news"]

    def delivered() -> bool:
        publisher.send(b"news: up")
        return bool(subscriber.poll(20))

    wait_until(delivered, what="a published message to reach the subscriber")
    assert subscriber.recv() == b"news: up"


# --- control -------------------------------------------------------------------------


def test_ping_statistics_and_errors(h: Harness) -> None:
    ins, left = h.pair(zmq.DEALER, zmq.DEALER)
    outs, right = h.pair(zmq.DEALER, zmq.DEALER)
    mon = h.socket(zmq.PUB)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    h.run(monitored_queue, ins, outs, mon, ctrl_socket=ctrl)
    assert command(control, b"PING") == [b"PONG"]
    assert stats(control) == dict.fromkeys(STAT_KEYS, 0)

    left.send_multipart([b"a" * 10, b"b" * 5])  # one message of 15 bytes
    left.send(b"c" * 7)
    right.send(b"x" * 3)
    assert right.recv_multipart() == [b"a" * 10, b"b" * 5]
    assert right.recv() == b"c" * 7
    assert left.recv() == b"x" * 3
    assert stats(control) == {
        "in_msgs_received": 2,
        "in_bytes_received": 22,
        "in_msgs_sent": 1,
        "in_bytes_sent": 3,
        "out_msgs_received": 1,
        "out_bytes_received": 3,
        "out_msgs_sent": 2,
        "out_bytes_sent": 22,
    }
    reply = command(control, b"STATISTICS")
    assert len(reply) == 8 and all(len(f) == 8 for f in reply)
    assert struct.unpack("=Q", reply[0])[0] == 2  # native-endian uint64

    assert command(control, b"ping") == [b"ERROR"]
    assert command(control, b"NOPE") == [b"ERROR"]
    assert command(control, b"") == [b"ERROR"]
    # a multipart command is consumed whole and answered once
    assert command(control, b"PING", b"extra", b"more") == [b"ERROR"]
    assert not control.poll(100)
    assert command(control, b"PING") == [b"PONG"]


def test_pause_holds_messages_and_resume_delivers_them_all(h: Harness) -> None:
    ins, left = h.pair(zmq.DEALER, zmq.DEALER)
    outs, right = h.pair(zmq.DEALER, zmq.DEALER)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    h.run(_core.proxy, ins, outs, None, ctrl)
    assert command(control, b"PAUSE") == [b"OK"]
    for i in range(300):
        left.send(b"L%d" % i)
        right.send(b"R%d" % i)
    assert not right.poll(300) and not left.poll(0)
    assert command(control, b"PING") == [b"PONG"]  # control keeps answering while paused
    assert stats(control)["in_msgs_received"] == 0
    assert command(control, b"RESUME") == [b"OK"]
    assert [right.recv() for _ in range(300)] == [b"L%d" % i for i in range(300)]
    assert [left.recv() for _ in range(300)] == [b"R%d" % i for i in range(300)]
    assert stats(control)["out_msgs_received"] == 300


def test_terminate_drains_what_is_queued_in_the_device_then_answers(h: Harness) -> None:
    ins, producer = h.pair(zmq.PULL, zmq.PUSH)
    outs, consumer = h.pair(zmq.PUSH, zmq.PULL)
    mon = h.socket(zmq.PUB)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    loop = h.run(monitored_queue, ins, outs, mon, ctrl_socket=ctrl)
    assert command(control, b"PAUSE") == [b"OK"]
    for i in range(500):  # inproc: in the device's queue as soon as send returns
        producer.send(b"%d" % i)
    assert command(control, b"TERMINATE") == [b"OK"]
    loop.join()
    assert loop.returned and loop.error is None
    assert [consumer.recv() for _ in range(500)] == [b"%d" % i for i in range(500)]


def test_terminate_waits_for_the_reply_to_a_request_forwarded_just_before(h: Harness) -> None:
    ins, client = h.pair(zmq.ROUTER, zmq.REQ)
    outs, worker = h.pair(zmq.DEALER, zmq.REP)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    loop = h.run(_core.proxy, ins, outs, None, ctrl, drain_timeout=2.0)
    working = threading.Event()

    def serve_one() -> None:
        if worker.poll(5000):
            request = worker.recv_multipart()
            working.set()
            time.sleep(0.05)  # the work itself, not a wait for a condition
            worker.send_multipart([b"reply to ", *request])

    replier = threading.Thread(target=serve_one)
    replier.start()
    client.send(b"request")
    assert working.wait(5), "the request never reached the worker"
    # the request is out; its reply is 50 ms away, and nothing else is in flight
    assert command(control, b"TERMINATE") == [b"OK"]
    replier.join(5)
    loop.join()
    assert client.poll(1000), "the reply was lost in the drain"
    assert client.recv_multipart() == [b"reply to ", b"request"]


def test_a_two_way_drain_ends_after_its_quiet_period(h: Harness) -> None:
    ins, _client = h.pair(zmq.ROUTER, zmq.DEALER)
    outs, _worker = h.pair(zmq.DEALER, zmq.DEALER)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    loop = h.run(_core.proxy, ins, outs, None, ctrl, drain_timeout=5.0, drain_quiet=0.2)
    assert command(control, b"PING") == [b"PONG"]
    started = time.monotonic()
    assert command(control, b"TERMINATE") == [b"OK"]
    loop.join()
    # nothing in flight: the drain lasts its quiet period, not its timeout
    assert 0.2 <= time.monotonic() - started < 2.0


def test_a_reply_read_while_draining_starts_the_quiet_period_over(h: Harness) -> None:
    """Two requests in flight at the stop; their replies come 0.4 s and 1.0 s later.

    Quiet period 0.8 s: a quiet timer that each read starts over runs to 1.2 s after the
    first reply, so it waits for the second (and ends 0.8 s after that); one that
    started at the first idle moment and never restarted ends at 0.8 s and loses it.
    """
    ins, first = h.pair(zmq.ROUTER, zmq.REQ)
    second = h.socket(zmq.REQ)
    second.connect(ins.last_endpoint.decode())
    outs, worker = h.pair(zmq.DEALER, zmq.DEALER)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    loop = h.run(_core.proxy, ins, outs, None, ctrl, drain_timeout=5.0, drain_quiet=0.8)
    first.send(b"fast")
    second.send(b"slow")
    requests = [worker.recv_multipart(), worker.recv_multipart()]
    received = time.monotonic()
    control.send(b"TERMINATE")  # answered OK only when the loop returns
    assert command(control, b"PING") == [b"PONG"]  # so the drain has begun

    def reply_later() -> None:
        for request in sorted(requests, key=lambda frames: frames[-1] != b"fast"):
            delay = 0.4 if request[-1] == b"fast" else 1.0
            time.sleep(max(0.0, received + delay - time.monotonic()))  # service times
            worker.send_multipart([*request[:-1], b"reply to " + request[-1]])

    replier = threading.Thread(target=reply_later)
    replier.start()
    replier.join(5)
    assert first.poll(2000) and first.recv() == b"reply to fast"
    assert second.poll(2000), "the drain ended before the reply to a request it forwarded"
    assert second.recv() == b"reply to slow"
    assert control.poll(5000) and control.recv_multipart() == [b"OK"]
    loop.join()
    assert time.monotonic() - received >= 1.0 + 0.8 - 0.05


def test_under_steady_traffic_a_drain_answers_what_it_read_and_takes_no_more(
    h: Harness,
) -> None:
    """A client keeps sending (a request every 5 ms, a 10 ms server): the drain reads what
    is queued at the stop, then no new request, and ends once every reply it owes is back,
    long before drain_timeout. Every request the server got is answered."""
    ins, client = h.pair(zmq.ROUTER, zmq.DEALER)
    outs, worker = h.pair(zmq.DEALER, zmq.DEALER)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    loop = h.run(_core.proxy, ins, outs, None, ctrl, drain_timeout=5.0, drain_quiet=0.1)
    stop = threading.Event()
    served: list[bytes] = []
    sent: list[bytes] = []
    answered: list[bytes] = []

    def serve() -> None:
        while not stop.is_set():
            if worker.poll(20):
                request = worker.recv_multipart()
                served.append(request[-1])
                time.sleep(0.01)  # the server's service time
                worker.send_multipart(request)

    def send_and_collect() -> None:
        next_send = time.monotonic()
        while not stop.is_set():
            if time.monotonic() >= next_send:
                sent.append(b"%d" % len(sent))
                client.send(sent[-1])
                next_send += 0.005  # a request every 5 ms
            while client.poll(0):
                answered.append(client.recv())
            time.sleep(0.001)  # the client's own pace between polls

    peers = [threading.Thread(target=serve), threading.Thread(target=send_and_collect)]
    for peer in peers:
        peer.start()
    try:
        wait_until(lambda: len(answered) >= 10, what="traffic flowing")
        began = time.monotonic()
        assert command(control, b"TERMINATE") == [b"OK"]
        drained_in = time.monotonic() - began
        loop.join()
        wait_until(lambda: len(sent) >= len(served) + 20, what="requests sent after the drain")
    finally:
        stop.set()
        for peer in peers:
            peer.join(5)
    assert drained_in < 2.0, f"the drain took {drained_in:.2f}s: new requests held it open"
    assert sorted(answered) == sorted(served), "a request the device forwarded lost its reply"


def test_terminate_gives_up_on_a_blocked_output_after_drain_timeout(h: Harness) -> None:
    ins, producer = h.pair(zmq.PULL, zmq.PUSH)
    outs, _stuck = h.pair(zmq.PUSH, zmq.PULL, peer_options={"rcvhwm": 5}, sndhwm=5)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    loop = h.run(_core.proxy, ins, outs, None, ctrl, drain_timeout=0.3)
    for i in range(100):
        producer.send(b"%d" % i)

    def holding() -> bool:
        counters = stats(control)
        return counters["in_msgs_received"] == counters["out_msgs_sent"] + 1 > 5

    wait_until(holding, what="the device to hold a message for its full output")
    started = time.monotonic()
    assert command(control, b"TERMINATE") == [b"OK"]
    loop.join()
    assert 0.25 <= time.monotonic() - started < 3.0
    assert loop.returned


@pytest.mark.parametrize("drain_timeout", [1e12, float("inf")])
def test_an_enormous_drain_timeout_drains_until_done(h: Harness, drain_timeout: float) -> None:
    ins, producer = h.pair(zmq.PULL, zmq.PUSH)
    outs, consumer = h.pair(zmq.PUSH, zmq.PULL, peer_options={"rcvhwm": 5}, sndhwm=5)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    loop = h.run(_core.proxy, ins, outs, None, ctrl, drain_timeout=drain_timeout)
    for i in range(100):
        producer.send(b"%d" % i)

    def holding() -> bool:
        counters = stats(control)
        return counters["in_msgs_received"] == counters["out_msgs_sent"] + 1 > 5

    wait_until(holding, what="the device to hold a message for its full output")
    control.send(b"TERMINATE")
    # the deadline is ~forever away: the loop waits for room, answering meanwhile
    assert command(control, b"PING") == [b"PONG"]
    assert loop.thread.is_alive() and not control.poll(100)
    assert [consumer.recv() for _ in range(100)] == [b"%d" % i for i in range(100)]
    assert control.poll(5000) and control.recv_multipart() == [b"OK"]
    loop.join()
    assert loop.returned


def test_router_control_socket_answers_through_the_envelope(h: Harness) -> None:
    ins, _ = h.pair(zmq.PULL, zmq.PUSH)
    outs, _ = h.pair(zmq.PUSH, zmq.PULL)
    ctrl = h.socket(zmq.ROUTER)
    ctrl.bind("inproc://ctrl")
    dealer = h.socket(zmq.DEALER)
    req = h.socket(zmq.REQ)
    dealer.connect("inproc://ctrl")
    req.connect("inproc://ctrl")
    h.run(_core.proxy, ins, outs, None, ctrl)
    assert command(dealer, b"PING") == [b"PONG"]
    assert command(req, b"PING") == [b"PONG"]
    assert command(dealer, b"PING", b"x") == [b"ERROR"]
    assert len(command(dealer, b"STATISTICS")) == 8
    assert command(dealer, b"TERMINATE") == [b"OK"]


def test_control_is_served_while_draining_and_every_command_gets_one_reply(h: Harness) -> None:
    ins, producer = h.pair(zmq.PULL, zmq.PUSH)
    outs, _stuck = h.pair(zmq.PUSH, zmq.PULL, peer_options={"rcvhwm": 5}, sndhwm=5)
    ctrl = h.socket(zmq.ROUTER)
    ctrl.bind("inproc://ctrl")
    first, second = h.socket(zmq.DEALER), h.socket(zmq.DEALER)
    first.connect("inproc://ctrl")
    second.connect("inproc://ctrl")
    loop = h.run(_core.proxy, ins, outs, None, ctrl, drain_timeout=1.0)
    for i in range(100):
        producer.send(b"%d" % i)

    def holding() -> bool:
        counters = stats(second)
        return counters["in_msgs_received"] == counters["out_msgs_sent"] + 1 > 5

    wait_until(holding, what="the device to hold a message for its full output")
    # the output stays full, so the drain lasts until drain_timeout
    first.send(b"TERMINATE")
    first.send(b"PING")  # queued behind TERMINATE
    assert first.poll(5000) and first.recv_multipart() == [b"PONG"]
    # draining now: the other peer's commands are answered at once, each exactly once
    assert command(second, b"PING") == [b"PONG"]
    assert len(command(second, b"STATISTICS")) == 8
    assert command(second, b"PAUSE") == [b"ERROR"]
    assert command(second, b"RESUME") == [b"ERROR"]
    assert command(second, b"BOGUS") == [b"ERROR"]
    assert loop.thread.is_alive() and not first.poll(0)
    second.send(b"TERMINATE")  # a second TERMINATE is answered when the loop returns too
    assert first.poll(5000) and first.recv_multipart() == [b"OK"]
    assert second.poll(5000) and second.recv_multipart() == [b"OK"]
    loop.join()
    assert loop.returned
    assert not first.poll(100) and not second.poll(0)


def test_unroutable_message_with_router_mandatory_is_dropped_and_the_loop_goes_on(
    h: Harness,
) -> None:
    ins = h.socket(zmq.ROUTER)
    outs = h.socket(zmq.ROUTER, router_mandatory=1)
    ins.bind("inproc://front")
    outs.bind("inproc://back")
    client = h.socket(zmq.DEALER, routing_id=b"client")
    worker = h.socket(zmq.DEALER, routing_id=b"worker")
    client.connect("inproc://front")
    worker.connect("inproc://back")
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    loop = h.run(_core.proxy, ins, outs, None, ctrl)
    # both ROUTERs learn their peer's identity from a first message
    settle(lambda: worker.send_multipart([b"client", b"hello"]), client)
    client.send_multipart([b"nobody", b"lost"])
    client.send_multipart([b"worker", b"found"])
    assert worker.recv_multipart() == [b"client", b"found"]
    counters = stats(control)
    assert counters["in_msgs_received"] == 2 and counters["out_msgs_sent"] == 1
    assert loop.error is None


def test_a_blocking_monitor_holds_the_data_path_but_not_the_control_socket(h: Harness) -> None:
    ins, producer = h.pair(zmq.PULL, zmq.PUSH)
    outs, consumer = h.pair(zmq.PUSH, zmq.PULL)
    mon = h.socket(zmq.DEALER, sndhwm=1)  # no peer yet: a DEALER cannot send at all
    mon.bind("inproc://mon")
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    h.run(monitored_queue, ins, outs, mon, ctrl_socket=ctrl)
    for i in range(5):
        producer.send(b"%d" % i)
    assert consumer.recv() == b"0"  # sent on, then held for the monitor
    assert not consumer.poll(200)
    assert command(control, b"PING") == [b"PONG"]
    tap = h.socket(zmq.DEALER)
    tap.connect("inproc://mon")
    assert [consumer.recv() for _ in range(4)] == [b"%d" % i for i in range(1, 5)]
    assert [tap.recv_multipart() for _ in range(5)] == [[b"in", b"%d" % i] for i in range(5)]


# --- load, backpressure, loss ---------------------------------------------------------


def _part(seq: int, index: int, size: int) -> bytes:
    head = b"%d/%d/" % (seq, index)
    return head + b"." * (size - len(head))


def _message(sender: bytes, seq: int) -> list[bytes]:
    """A test message of 1-5 parts whose header says how many; sizes vary."""
    nparts = 1 + seq % 5
    parts = [_part(seq, index, 20 + (seq * 7 + index * 13) % 200) for index in range(nparts)]
    return [b"%s:%d:%d" % (sender, seq, nparts), *parts]


def _check_frames(frames: list[bytes]) -> tuple[str, int]:
    """Check a test message against its header; return (sender, sequence number)."""
    sender, seq, nparts = frames[0].split(b":")
    assert len(frames) == int(nparts) + 1, f"torn message {frames[:1]!r}"
    for index, part in enumerate(frames[1:]):
        assert part == _part(int(seq), index, len(part)), f"corrupt part of {frames[0]!r}"
    return sender.decode(), int(seq)


def test_multipart_messages_stay_whole_under_load_both_ways(h: Harness) -> None:
    ins, left = h.pair(zmq.DEALER, zmq.DEALER)
    outs, right = h.pair(zmq.DEALER, zmq.DEALER)
    mon = h.socket(zmq.PUB, sndhwm=100_000)
    mon.bind(h.endpoint())
    tap = subscribed_monitor(h, mon)
    tap.rcvhwm = 100_000
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    h.run(monitored_queue, ins, outs, mon, ctrl_socket=ctrl)
    settle(lambda: left.send_multipart(_message(b"probe", 0)), right, tap)
    count = 3000
    received: dict[str, list[int]] = {"L": [], "R": []}

    def peer(sock: Socket, name: bytes, other: str) -> None:
        for seq in range(count):
            sock.send_multipart(_message(name, seq))
            while sock.poll(0):
                received[other].append(_check_frames(sock.recv_multipart())[1])
        while len(received[other]) < count and sock.poll(5000):
            received[other].append(_check_frames(sock.recv_multipart())[1])

    threads = [
        threading.Thread(target=peer, args=(left, b"L", "R")),
        threading.Thread(target=peer, args=(right, b"R", "L")),
    ]
    for thread in threads:
        thread.start()
    monitored = 0
    while monitored < 2 * count and tap.poll(5000):
        frames = tap.recv_multipart()
        assert frames[0] in (b"in", b"out")
        _check_frames(frames[1:])
        monitored += 1
    for thread in threads:
        thread.join(30)
    assert received["L"] == list(range(count)) and received["R"] == list(range(count))
    assert monitored == 2 * count
    counters = stats(control)
    assert counters["in_msgs_received"] == counters["out_msgs_sent"]  # count + the probes
    assert counters["out_msgs_received"] == counters["in_msgs_sent"] == count


def test_output_at_hwm_holds_only_its_direction(h: Harness) -> None:
    ins, left = h.pair(zmq.DEALER, zmq.DEALER)
    outs, right = h.pair(zmq.DEALER, zmq.DEALER, peer_options={"rcvhwm": 10}, sndhwm=10)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    h.run(_core.proxy, ins, outs, None, ctrl)
    sent = 0
    # `right` does not read: fill until `left` has stayed unwritable for a while
    while sent < 10_000 and left.poll(300, zmq.POLLOUT):
        left.send(b"L%d" % sent)
        sent += 1
    assert sent < 10_000, "the in -> out direction never filled up"
    counters = stats(control)  # the control socket is served...
    assert counters["in_msgs_received"] == counters["out_msgs_sent"] + 1  # ...one message held
    for i in range(200):  # the other direction still flows
        right.send(b"R%d" % i)
    assert [left.recv() for _ in range(200)] == [b"R%d" % i for i in range(200)]
    before = stats(control)
    assert before["out_msgs_received"] == 200
    assert [right.recv() for _ in range(sent)] == [b"L%d" % i for i in range(sent)]
    assert stats(control)["out_msgs_sent"] == sent


def _burst_device(
    endpoints: tuple[str, str, str], ctrl_endpoint: str, ready: Any, rcvhwm: int | None
) -> None:
    ctx: zmq.Context[Socket] = zmq.Context()
    ins, outs, mon = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH), ctx.socket(zmq.PUB)
    if rcvhwm is not None:
        ins.rcvhwm = rcvhwm
    for sock, endpoint in zip((ins, outs, mon), endpoints, strict=True):
        sock.linger = 0
        sock.bind(endpoint)
    ctrl = ctx.socket(zmq.PAIR)
    ctrl.linger = 1000
    ctrl.bind(ctrl_endpoint)
    ready.set()
    try:
        monitored_queue(ins, outs, mon, ctrl_socket=ctrl)
    finally:
        for sock in (ins, outs, mon, ctrl):
            sock.close()
        ctx.term()


def _burst_producer(endpoint: str, count: int) -> None:
    ctx: zmq.Context[Socket] = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    for i in range(count):
        push.send(b"%016d" % i)
    push.close(linger=20_000)  # bounded: every message leaves before we disconnect
    ctx.term()


def _free_tcp_endpoint() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize(
    "transport",
    [
        "tcp",
        # Over ipc the peer's hang-up makes libzmq 4.3.5 drop what it had not yet read
        # from the kernel whenever the device's input queue is at its HWM at that moment
        # (libzmq issue 4660): a loop that keeps up is lossless on a quiet machine, but on
        # a loaded one libzmq's own proxy loses too (the reliability suite reports those
        # counts). With rcvhwm = 0 on the device's in-socket the queue never fills and
        # nothing is lost, whatever the load: that is the configuration asserted here.
        pytest.param("ipc", marks=pytest.mark.slow),
    ],
)
def test_producer_bursting_then_disconnecting_loses_nothing(ipc_dir: Any, transport: str) -> None:
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    if transport == "ipc":
        endpoints = tuple(f"ipc://{ipc_dir}/{name}" for name in ("in", "out", "mon"))
    else:
        endpoints = tuple(_free_tcp_endpoint() for _ in range(3))
    count = 200_000
    ready = mp.Event()
    ctrl_endpoint = f"ipc://{ipc_dir}/ctrl"
    rcvhwm = 0 if transport == "ipc" else None
    device = mp.Process(target=_burst_device, args=(endpoints, ctrl_endpoint, ready, rcvhwm))
    device.start()
    ctx: zmq.Context[Socket] = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    control = ctx.socket(zmq.PAIR)
    sub = ctx.socket(zmq.SUB)
    try:
        assert ready.wait(10)
        for sock in (pull, control, sub):
            sock.linger = 0
        pull.connect(endpoints[1])
        sub.subscribe(b"")  # a subscribed monitor, as in real use
        sub.connect(endpoints[2])
        control.connect(ctrl_endpoint)
        assert command(control, b"PING") == [b"PONG"]
        producer = mp.Process(target=_burst_producer, args=(endpoints[0], count))
        producer.start()
        # a lean consumer: a slow one would back the device up into its input queue,
        # where libzmq drops on disconnect whatever loop runs the device
        received: list[bytes] = []
        recv, keep = pull.recv, received.append
        while len(received) < count and pull.poll(3000):
            while pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                keep(recv())
        producer.join(20)
        assert len(received) == count, f"lost {count - len(received)} of {count}"
        assert received == [b"%016d" % i for i in range(count)]
        assert command(control, b"TERMINATE") == [b"OK"]
        device.join(10)
        assert device.exitcode == 0
    finally:
        for sock in (pull, control, sub):
            sock.close(linger=0)
        ctx.term()
        if device.is_alive():
            device.kill()
            device.join()


def _nodrop_monitor_device(endpoints: tuple[str, str, str], ctrl_endpoint: str, ready: Any) -> None:
    """A device whose monitor is an XPUB with XPUB_NODROP: always writable, yet it refuses."""
    ctx: zmq.Context[Socket] = zmq.Context()
    ins, outs, mon = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH), ctx.socket(zmq.XPUB)
    mon.setsockopt(zmq.XPUB_NODROP, 1)
    mon.sndhwm = 1
    for sock, endpoint in zip((ins, outs, mon), endpoints, strict=True):
        sock.linger = 0
        sock.bind(endpoint)
    ctrl = ctx.socket(zmq.PAIR)
    ctrl.linger = 1000
    ctrl.bind(ctrl_endpoint)
    ready.set()
    try:
        _core.proxy(ins, outs, mon, ctrl, drain_timeout=0.2)
    finally:
        for sock in (ins, outs, mon, ctrl):
            sock.close()
        ctx.term()


def test_a_monitor_that_claims_room_but_refuses_does_not_spin(ipc_dir: Any) -> None:
    import multiprocessing

    import psutil

    mp = multiprocessing.get_context("fork")
    endpoints = tuple(f"ipc://{ipc_dir}/{name}" for name in ("in", "out", "mon"))
    ctrl_endpoint = f"ipc://{ipc_dir}/ctrl"
    ready = mp.Event()
    device = mp.Process(target=_nodrop_monitor_device, args=(endpoints, ctrl_endpoint, ready))
    device.start()
    ctx: zmq.Context[Socket] = zmq.Context()
    producer, consumer = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    tap, control = ctx.socket(zmq.SUB), ctx.socket(zmq.PAIR)
    try:
        assert ready.wait(10)
        for sock in (producer, consumer, tap, control):
            sock.linger = 0
        tap.rcvhwm = 1
        tap.subscribe(b"")
        for sock, endpoint in zip((producer, consumer, tap), endpoints, strict=True):
            sock.connect(endpoint)
        control.connect(ctrl_endpoint)
        settle(lambda: producer.send(b"probe"), consumer, tap)
        count = 200
        for i in range(count):  # big messages fill the subscriber's buffers quickly
            producer.send(b"%04d" % i + b"x" * 65_536)
        previous: list[dict[str, int]] = []

        def stalled() -> bool:
            # The subscriber never reads: the device must end up holding a message for its
            # monitor, its counters frozen, with most of the producer's messages unread.
            while consumer.poll(0):
                consumer.recv()
            counters = stats(control)
            frozen = previous[-1:] == [counters]
            previous.append(counters)
            return frozen and counters["in_msgs_received"] < count

        wait_until(stalled, timeout=10, interval=0.1, what="the monitor to stall the device")
        assert device.pid is not None
        proc = psutil.Process(device.pid)
        before, started = sum(proc.cpu_times()[:2]), time.monotonic()
        assert not consumer.poll(1000)  # the measuring window: still stalled throughout
        used, window = sum(proc.cpu_times()[:2]) - before, time.monotonic() - started
        # A spinning loop burns the whole window (a full core); a waiting one a few percent.
        assert used < 0.25 * window, f"{used:.2f}s of CPU in {window:.2f}s while stalled"
        assert command(control, b"PING") == [b"PONG"]
        assert command(control, b"TERMINATE") == [b"OK"]
        device.join(10)
        assert device.exitcode == 0
    finally:
        for sock in (producer, consumer, tap, control):
            sock.close(linger=0)
        ctx.term()
        if device.is_alive():
            device.kill()
            device.join()


# --- signals and ETERM -----------------------------------------------------------------


def _signal_device(endpoints: tuple[str, str], handled: Any, ready: Any) -> None:
    """A device as devmgr runs one: signals reach the loop through the wakeup fd."""
    import signal
    import socket

    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

    def on_usr1(signum: int, frame: object) -> None:
        with handled.get_lock():
            handled.value += 1

    def on_usr2(signum: int, frame: object) -> None:
        raise RuntimeError("raised by a handler")

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    ctx: zmq.Context[Socket] = zmq.Context()
    ins, outs = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    ins.bind(endpoints[0])
    outs.bind(endpoints[1])
    ready.set()
    status = 0
    try:
        _core.proxy(ins, outs, signal_fd=wake_r.fileno(), drain_timeout=2.0)
    except RuntimeError as exc:
        status = 3 if str(exc) == "raised by a handler" else 4
    finally:
        ins.close(linger=0)
        outs.close(linger=2000)
        ctx.term()
    os._exit(status)


@pytest.mark.parametrize(("stop_signal", "expected_status"), [("SIGTERM", 0), ("SIGUSR2", 3)])
def test_signals_during_heavy_traffic(ipc_dir: Any, stop_signal: str, expected_status: int) -> None:
    import multiprocessing
    import signal

    mp = multiprocessing.get_context("fork")
    endpoints = (f"ipc://{ipc_dir}/in", f"ipc://{ipc_dir}/out")
    handled = mp.Value("i", 0)
    ready = mp.Event()
    device = mp.Process(target=_signal_device, args=(endpoints, handled, ready))
    device.start()
    ctx: zmq.Context[Socket] = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        assert ready.wait(10)
        for sock in (push, pull):
            sock.linger = 0
        push.connect(endpoints[0])
        pull.connect(endpoints[1])
        pid = device.pid
        assert pid is not None
        received = 0
        signals_sent = 0
        for batch in range(40):
            # keep what is in flight bounded, so neither side waits on the other forever
            while batch * 500 - received > 2000 and pull.poll(3000):
                assert pull.recv_multipart() == [b"%d" % received, b"x" * 100]
                received += 1
            for i in range(500):
                push.send_multipart([b"%d" % (batch * 500 + i), b"x" * 100])
            os.kill(pid, signal.SIGUSR1)
            signals_sent += 1
            while pull.poll(0):
                assert pull.recv_multipart() == [b"%d" % received, b"x" * 100]
                received += 1
        # handlers ran while the loop was still relaying, not after it ended
        wait_until(lambda: handled.value > 0, what="the SIGUSR1 handler to run")
        assert device.is_alive()
        while received < 20_000 and pull.poll(3000):
            assert pull.recv_multipart() == [b"%d" % received, b"x" * 100]
            received += 1
        assert received == 20_000
        assert 0 < handled.value <= signals_sent
        os.kill(pid, getattr(signal, stop_signal))
        device.join(10)
        assert device.exitcode == expected_status
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
        if device.is_alive():
            device.kill()
            device.join()


def test_a_blocking_signal_fd_is_refused(h: Harness) -> None:
    import socket

    ins, _ = h.pair(zmq.PULL, zmq.PUSH)
    outs, _ = h.pair(zmq.PUSH, zmq.PULL)
    read_end, write_end = socket.socketpair()  # blocking, as sockets are by default
    try:
        loop = h.run(_core.proxy, ins, outs, signal_fd=read_end.fileno())
        loop.join()  # refused at once, not left to hang the loop in read()
        assert isinstance(loop.error, ValueError), loop.error
        assert "non-blocking" in str(loop.error)
    finally:
        read_end.close()
        write_end.close()


def _thread_cpu_seconds(native_id: int) -> float:
    import psutil

    for thread in psutil.Process().threads():
        if thread.id == native_id:
            return float(thread.user_time + thread.system_time)
    raise AssertionError(f"no thread {native_id}")


def test_a_signal_fd_at_end_of_file_is_not_polled_in_a_spin(h: Harness) -> None:
    import socket

    ins, producer = h.pair(zmq.PULL, zmq.PUSH)
    outs, consumer = h.pair(zmq.PUSH, zmq.PULL)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR)
    read_end, write_end = socket.socketpair()
    read_end.setblocking(False)
    write_end.close()  # end-of-file: the fd stays readable for good
    try:
        loop = h.run(_core.proxy, ins, outs, None, ctrl, signal_fd=read_end.fileno())
        assert command(control, b"PING") == [b"PONG"]
        native_id = loop.thread.native_id
        assert native_id is not None
        before, started = _thread_cpu_seconds(native_id), time.monotonic()
        assert not consumer.poll(1000)  # the measuring window: the loop has nothing to do
        used = _thread_cpu_seconds(native_id) - before
        window = time.monotonic() - started
        # A loop spinning on the readable fd burns what CPU it gets (a full core when the
        # machine is idle, ~30% of one at a load of 9 on 2 cores); one waiting in zmq_poll
        # uses none, within the 10 ms resolution of the thread's CPU times.
        assert used < 0.1 * window, f"{used:.2f}s of CPU in {window:.2f}s at EOF"
        producer.send(b"still forwarding")
        assert consumer.recv() == b"still forwarding"
        assert command(control, b"TERMINATE") == [b"OK"]
        loop.join()
        assert loop.returned, loop.error
    finally:
        read_end.close()


def test_a_chatty_control_peer_cannot_starve_forwarding(h: Harness) -> None:
    """20,000 commands queued before one data message: the message must not wait for all.

    The STATISTICS at the end of the command queue tells what the loop had forwarded by
    the time it got there: reading commands in bounded bursts, it served the data socket
    in between.
    """
    unbounded = {"sndhwm": 0, "rcvhwm": 0}
    ins, producer = h.pair(zmq.PULL, zmq.PUSH)
    outs, consumer = h.pair(zmq.PUSH, zmq.PULL)
    ctrl, control = h.pair(zmq.PAIR, zmq.PAIR, peer_options=unbounded, **unbounded)
    producer.send(b"data")
    for _ in range(20_000):
        control.send(b"PING")
    control.send(b"STATISTICS")
    loop = h.run(_core.proxy, ins, outs, None, ctrl)
    assert consumer.recv() == b"data"
    for _ in range(20_000):
        assert control.recv() == b"PONG"
    counters = parse_stats(control.recv_multipart())
    assert counters["in_msgs_received"] == 1, "forwarding waited for every control command"
    assert command(control, b"TERMINATE") == [b"OK"]
    loop.join()


def test_the_libzmq_version_is_checked_at_import() -> None:
    # the one pyzmq loaded passed the check when devmgr._core was imported
    low, high = _core.LIBZMQ_SUPPORTED
    assert low <= _core.libzmq_version() < high
    _core.check_libzmq_version((4, 3, 5))
    for version in ((3, 2, 5), (4, 1, 6), (5, 0, 0)):
        found = re.escape(".".join(map(str, version)))
        with pytest.raises(ImportError, match=rf"libzmq {found} \(/x/libzmq\.so\)"):
            _core.check_libzmq_version(version, "/x/libzmq.so")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_context_termination_raises_context_terminated_as_pyzmq(impl: str) -> None:
    ctx: zmq.Context[Socket] = zmq.Context()
    ins, outs, mon = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER), ctx.socket(zmq.PUB)
    for sock in (ins, outs, mon):
        sock.linger = 0
    ins.bind("inproc://in")
    outs.bind("inproc://out")
    started = threading.Event()

    def run() -> None:
        started.set()
        try:
            IMPLEMENTATIONS[impl](ins, outs, mon)
        finally:
            for sock in (ins, outs, mon):
                sock.close()

    loop = LoopThread(run)
    assert started.wait(5)
    ctx.term()  # returns once the loop has seen ETERM and closed its sockets
    loop.join()
    assert isinstance(loop.error, zmq.ContextTerminated)


_SECOND_LIBZMQ = """
import ctypes, sys
copy, order = sys.argv[1], sys.argv[2]
if order == "before-pyzmq":
    ctypes.CDLL(copy, mode=ctypes.RTLD_GLOBAL)  # pyzmq's calls then bind to the copy
import zmq
if order == "after-pyzmq":
    ctypes.CDLL(copy, mode=ctypes.RTLD_GLOBAL)
try:
    import devmgr._core
except ImportError as exc:
    print("refused:", exc)
else:
    print("imported, calling", devmgr._core.libzmq_path())
"""


@pytest.mark.parametrize("order", ["before-pyzmq", "after-pyzmq"])
def test_a_second_libzmq_in_the_global_scope_is_refused(tmp_path: Any, order: str) -> None:
    import shutil
    import subprocess
    import sys

    bundled = _core.libzmq_path()
    assert bundled is not None
    # A second libzmq, as a distribution's would be: pyzmq's code under another file name
    # and another SONAME (with the same SONAME the loader would take it for pyzmq's own
    # and map only one). Its libsodium is found beside it through its $ORIGIN rpath.
    with open(bundled, "rb") as original:
        image = original.read()
    soname = os.path.basename(bundled).encode()
    assert image.count(soname) == 1, "the SONAME should be the library's file name"
    copy = tmp_path / "libzmq-second-copy.so"
    copy.write_bytes(image.replace(soname, b"X" * len(soname)))
    for sibling in os.scandir(os.path.dirname(bundled)):
        if sibling.is_file() and "libzmq" not in sibling.name:
            shutil.copyfile(sibling.path, tmp_path / sibling.name)
    done = subprocess.run(
        [sys.executable, "-c", _SECOND_LIBZMQ, str(copy), order],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: two copies of libzmq"), done.stdout
    assert str(copy) in done.stdout


def test_only_one_libzmq_is_mapped() -> None:
    with open("/proc/self/maps") as maps:
        mapped = {line.split()[-1] for line in maps if "libzmq" in line.rsplit("/", 1)[-1]}
    assert len(mapped) == 1, mapped
    resolved = _core.libzmq_path()
    assert resolved is not None
    assert {os.path.realpath(p) for p in mapped} == {os.path.realpath(resolved)}
    assert _core.libzmq_version() == zmq.zmq_version_info()
