"""Request-reply peers for restart tests: Lazy Pirate clients that check their replies,
and echo workers that connect (as the Guide's rrworker does) and can hold a reply.

Both are real ZeroMQ peers (REQ and REP sockets over ipc or tcp), each driven from a
thread of its own; no socket is shared between threads.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq


class LazyPirateClient:
    """A REQ client in the Guide's Lazy Pirate pattern that checks what it gets back.

    Each request body is unique (`name:seq`), and the echo worker returns it as is, so a
    reply that differs from the request was meant for another client: a misdelivery.
    On a timeout the client closes its socket and resends on a fresh one, as lpclient.py
    does.
    """

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, name: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.name = name
        self.seq = 0
        self.sock: zmq.Socket[Any] | None = None
        self.ok = 0
        self.timeouts = 0
        self.abandoned = 0
        self.misdelivered: list[tuple[bytes, bytes]] = []  # (sent, received)
        # every try: (its body, "ok" | "timeout" | "misdelivered")
        self.tries: list[tuple[bytes, str]] = []
        self.open()

    def open(self) -> None:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def next_body(self) -> bytes:
        self.seq += 1
        return f"{self.name}:{self.seq}".encode()

    def send(self, body: bytes) -> None:
        assert self.sock is not None
        self.sock.send(body)

    def wait(self, timeout: float) -> bytes | None:
        """The next reply, or None after `timeout` seconds."""
        assert self.sock is not None
        if self.sock.poll(int(timeout * 1000)) & zmq.POLLIN:
            return bytes(self.sock.recv())
        return None

    def request(self, timeout: float, retries: int) -> bytes | None:
        """Send a new request; retry on a fresh socket after each timeout; check the reply.

        Each try has a body of its own (`name:seq.try`), so a reply tells which try it
        answers. Returns the reply (right or wrong), or None when every try timed out.
        """
        request = self.next_body()
        for attempt in range(retries):
            body = request + b".%d" % attempt
            self.send(body)
            reply = self.wait(timeout)
            if reply is not None:
                if reply == body:
                    self.ok += 1
                    self.tries.append((body, "ok"))
                else:
                    self.misdelivered.append((body, reply))
                    self.tries.append((body, "misdelivered"))
                return reply
            self.timeouts += 1
            self.tries.append((body, "timeout"))
            self.close()  # the REQ socket is stuck waiting: start over, as lpclient does
            self.open()
        self.abandoned += 1
        return None


class EchoWorker:
    """A REP worker that connects to a queue's out-socket and echoes each request.

    `hold=True` keeps each reply until `release()`, so a test can restart the device
    while the worker still owes a reply. `delay` is the service time per request.
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        *,
        delay: float = 0.0,
        hold: bool = False,
        reconnect_ivl_ms: int = 100,
    ) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.delay = delay
        self.reconnect_ivl_ms = reconnect_ivl_ms  # libzmq's default is 100
        self.received: list[bytes] = []
        self.replied = 0
        self._gate = threading.Event()
        if not hold:
            self._gate.set()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EchoWorker:
        self._thread.start()
        self._ready.wait(5.0)
        return self

    def release(self) -> None:
        self._gate.set()

    def stop(self) -> None:
        self._stop.set()
        self._gate.set()
        self._thread.join(5.0)
        assert not self._thread.is_alive(), "echo worker did not stop"

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, self.reconnect_ivl_ms)
        sock.connect(self.endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(20) & zmq.POLLIN:
                    continue
                request = sock.recv()
                self.received.append(bytes(request))
                while not self._gate.wait(0.02):
                    if self._stop.is_set():
                        return
                if self.delay:
                    time.sleep(self.delay)  # the service time of this worker
                sock.send(request)
                self.replied += 1
        finally:
            sock.close(linger=0)
