"""Event streams: a manager's lifecycle events as iterators (docs/events.md).

`Client.events()` returns an EventStream (a plain iterator), `AsyncClient.events()` an
AsyncEventStream (an async iterator). Both find the events endpoint with a `status`
request, subscribe with a SUB socket (CURVE when the client uses it) and yield each
event's JSON object as a dict. They end, without an exception, when the stream or its
client is closed.

A slow consumer: the manager's PUB socket queues at most 1,000 messages for each
subscriber (ZeroMQ's default high-water mark) and the SUB socket 1,000 more; beyond that
the PUB drops events for that subscriber without telling it. Events carry no sequence
number, so a stream cannot count what it missed; `status` is the state to re-read after
a gap. A subscription takes effect a moment after it is made (ZeroMQ's slow joiner):
events published before then are not seen.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import zmq
    import zmq.asyncio

CurveKeys = tuple[bytes, bytes, bytes]


def _check_filters(
    devices: list[str] | None, kinds: list[str] | None
) -> tuple[frozenset[str] | None, list[bytes]]:
    """Return (device names or None for all, subscription prefixes).

    Raises:
        TypeError, ValueError: a filter that is not a list of strings, or an unknown kind.
    """
    names: frozenset[str] | None = None
    if devices is not None:
        if isinstance(devices, str) or not all(isinstance(d, str) for d in devices):
            raise TypeError("devices is a list of device names")
        names = frozenset(devices)
    if kinds is None:
        return names, [b""]
    if isinstance(kinds, str) or not all(isinstance(k, str) for k in kinds):
        raise TypeError("kinds is a list of event topics, e.g. ['device.exited']")
    from typing import get_args

    from devmgr._protocol import EventTopic

    topics = get_args(EventTopic)
    for kind in kinds:
        if not kind or not any(topic.startswith(kind) for topic in topics):
            raise ValueError(
                f"unknown event kind {kind!r}: give topics or their prefixes ({', '.join(topics)})"
            )
    return names, [kind.encode() for kind in kinds]


def _decode(frames: list[bytes], names: frozenset[str] | None) -> dict[str, Any] | None:
    try:
        event = json.loads(frames[-1])
    except (ValueError, IndexError):
        return None
    if not isinstance(event, dict):
        return None
    if names is not None and event.get("device") not in names:
        return None
    return event


def _subscribe(
    sock: Any, curve_keys: CurveKeys | None, prefixes: list[bytes], endpoint: str
) -> None:
    import zmq

    sock.setsockopt(zmq.LINGER, 0)
    if curve_keys is not None:  # a CURVE manager's events socket is CURVE too
        public, secret, server_public = curve_keys
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    for prefix in prefixes:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    sock.connect(endpoint)


class EventStream:
    """The events of one manager, as an iterator of dicts (see the module docstring).

    Made by `Client.events()`, which connects at once (a `status` request finds the
    events endpoint: ManagerUnreachable when none answers). `close()` (of the stream or
    of its client, from any thread) ends the iteration; so does leaving a `with` block.
    """

    def __init__(
        self,
        endpoint: Callable[[], str],
        curve_keys: CurveKeys | None,
        devices: list[str] | None,
        kinds: list[str] | None,
        on_close: Callable[[EventStream], None],
    ) -> None:
        import zmq

        self._names, prefixes = _check_filters(devices, kinds)
        self._on_close = on_close
        self.endpoint = endpoint()
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        try:
            _subscribe(self._sock, curve_keys, prefixes, self.endpoint)
        except zmq.ZMQError:
            self._sock.close(linger=0)
            self._ctx.term()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()  # held while a thread waits in __next__
        self._closing = False
        self._done = False

    def __iter__(self) -> EventStream:
        return self

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __next__(self) -> dict[str, Any]:
        import zmq

        with self._lock:
            poller = zmq.Poller()
            while not self._done:
                if self._closing:
                    self._release()
                    break
                poller.register(self._sock, zmq.POLLIN)
                poller.register(self._wake_r, zmq.POLLIN)
                ready = dict(poller.poll())
                if self._wake_r in ready or self._closing:
                    self._release()
                    break
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
                event = _decode(frames, self._names)
                if event is not None:
                    return event
        raise StopIteration

    def close(self) -> None:
        """End the stream: an iteration waiting in another thread returns at once."""
        if self._closing:
            return
        self._closing = True
        self._on_close(self)
        if self._lock.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._lock.release()
        else:
            os.write(self._wake_w, b"x")  # the iterating thread releases everything

    def _release(self) -> None:
        if self._done:
            return
        self._done = True
        self._sock.close(linger=0)
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)


class AsyncEventStream:
    """The events of one manager, as an async iterator of dicts (module docstring).

    Made by `AsyncClient.events()`; it connects at the first `__anext__` (a `status`
    request finds the events endpoint). `close()` or `await aclose()` (or the client's
    close) ends an `async for` waiting on it; so does leaving `async with`.
    """

    def __init__(
        self,
        endpoint: Callable[[], Awaitable[str]],
        curve_keys: CurveKeys | None,
        devices: list[str] | None,
        kinds: list[str] | None,
        on_close: Callable[[AsyncEventStream], None],
    ) -> None:
        self._names, self._prefixes = _check_filters(devices, kinds)
        self._find_endpoint = endpoint
        self._curve_keys = curve_keys
        self._on_close = on_close
        self.endpoint: str | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._closing: asyncio.Future[None] | None = None
        self._waiting = False
        self._closed = False

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _open(self) -> None:
        import zmq
        import zmq.asyncio

        endpoint = await self._find_endpoint()
        if self._closed:
            return
        self.endpoint = endpoint
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        try:
            _subscribe(self._sock, self._curve_keys, self._prefixes, self.endpoint)
        except zmq.ZMQError:
            self._release()
            raise
        self._closing = asyncio.get_running_loop().create_future()

    async def __anext__(self) -> dict[str, Any]:
        if self._sock is None and not self._closed:
            await self._open()
        self._waiting = True
        try:
            while not self._closed:
                assert self._sock is not None and self._closing is not None
                receive: asyncio.Future[Any] = asyncio.ensure_future(self._sock.recv_multipart())
                closing: asyncio.Future[Any] = self._closing
                await asyncio.wait({receive, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    break
                event = _decode(receive.result(), self._names)
                if event is not None:
                    return event
        finally:
            self._waiting = False
            if self._closed:
                self._release()
        raise StopAsyncIteration

    def close(self) -> None:
        """End the stream: an `async for` waiting on it ends at once."""
        if self._closed:
            return
        self._closed = True
        self._on_close(self)
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)
        if not self._waiting:
            self._release()

    async def aclose(self) -> None:
        self.close()

    def _release(self) -> None:
        if self._sock is not None and not self._sock.closed:
            self._sock.close(linger=0)
        if self._ctx is not None and not self._ctx.closed:
            self._ctx.term()
