"""`devmgr.AsyncClient`: `Client`'s methods as coroutines, on `zmq.asyncio` (docs/protocol.md).

One DEALER connection per client and event loop; each request carries its own id and a
reader task hands every reply to the request it answers, so any number of calls may be
in flight at once (`asyncio.gather(client.status(), client.ping(), ...)`). Endpoint
resolution, CURVE certificates, request encoding and the following of long commands
are Client's (devmgr/_client.py); only the waiting differs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from devmgr._client import (
    LONG_COMMANDS,
    CurvePair,
    _Follower,
    _load_curve_keys,
    _names,
    _parse_reply,
    _spec_data,
    connectable,
    resolve_endpoint,
)
from devmgr._errors import ControlError, DevmgrError, ManagerUnreachable
from devmgr._wire import MAX_REQUEST_BYTES, PROTOCOL_VERSION

if TYPE_CHECKING:
    import zmq.asyncio

    from devmgr._events import AsyncEventStream

#: Requests in flight on one connection at most: short ones (and the status probes of
#: long ones), long ones. The manager's ROUTER drops a reply when CONTROL_SNDHWM (100)
#: wait unread for one client, and libzmq reports reads back to the writer only every
#: half of that (its low-water mark): 48 in flight never meet the limit. More calls
#: than this wait for a slot.
_SHORT_SLOTS, _LONG_SLOTS = 32, 16

#: With no reply on the connection for this long, a request first checks (with a plain
#: connection) that anything listens, so a manager that is gone is said at once.
_PROBE_AFTER = 1.0


class _Connection:
    """A zmq.asyncio DEALER bound to one event loop, and the requests waiting on it."""

    def __init__(self, endpoint: str, curve_keys: tuple[bytes, bytes, bytes] | None) -> None:
        import zmq
        import zmq.asyncio

        from devmgr._zmtp import MAX_FRAME_BYTES

        self.loop = asyncio.get_running_loop()
        self.endpoint = endpoint
        self.ctx = zmq.asyncio.Context()
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        if curve_keys is not None:
            public, secret, server_public = curve_keys
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self.ctx.term()
            from devmgr._errors import ConfigError

            raise ConfigError(f"cannot connect to {endpoint!r}: {exc.strerror}") from exc
        self.sock: zmq.asyncio.Socket = sock
        #: request id -> (future of its reply, whether the manager may not read it, sent at)
        self.pending: dict[int, tuple[asyncio.Future[dict[str, Any]], bool, float]] = {}
        self.last_reply = 0.0
        self.reached = False
        self.stale = False  # a request timed out: replace the connection once idle
        self.nothing_why = ""
        self._probe: asyncio.Task[bool] | None = None
        self.short_slots = asyncio.Semaphore(_SHORT_SLOTS)
        self.long_slots = asyncio.Semaphore(_LONG_SLOTS)
        self._reader = self.loop.create_task(self._read())

    async def _read(self) -> None:
        import zmq

        while True:
            try:
                frames = await self.sock.recv_multipart()
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            reply = _parse_reply(frames)
            if reply is None:
                continue
            self.last_reply = time.monotonic()
            self.reached = True
            entry = self.pending.pop(reply["id"], None) if _hashable(reply.get("id")) else None
            if entry is None and reply.get("id") is None and reply.get("ok") is False:
                entry = self._unreadable()
            if entry is not None and not entry[0].done():
                entry[0].set_result(reply)

    def _unreadable(self) -> tuple[asyncio.Future[dict[str, Any]], bool, float] | None:
        """The request an error with id null answers: one the manager could not read.

        The oldest of those that look unreadable to it (over 1 MiB, or not strict JSON),
        else the oldest waiting.
        """
        if not self.pending:
            return None
        suspects = [rid for rid, (_, suspect, _) in self.pending.items() if suspect]
        rid = suspects[0] if suspects else min(self.pending, key=lambda r: self.pending[r][2])
        return self.pending.pop(rid)

    def submit(self, request_id: int, payload: bytes) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        suspect = len(payload) > MAX_REQUEST_BYTES or b"NaN" in payload or b"Infinity" in payload
        self.pending[request_id] = (future, suspect, time.monotonic())
        return future

    def forget(self, request_id: int) -> None:
        self.pending.pop(request_id, None)

    async def send(self, payload: bytes, deadline: float) -> bool:
        import zmq

        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(self.sock.send(payload), max(0.0, remaining))
        except TimeoutError:
            return False
        except zmq.ZMQError as exc:
            raise ManagerUnreachable(
                f"no reply from a devmgr manager at {self.endpoint}: {exc}"
            ) from exc
        return True

    async def listens(self, deadline: float) -> bool | None:
        """False when nothing listens (said at once), True when something does, None
        when unknown; one check at a time is shared by every request waiting on it."""
        if time.monotonic() - self.last_reply < _PROBE_AFTER:
            return True
        if self._probe is None or self._probe.done():
            self._probe = self.loop.create_task(_probe(self.endpoint, deadline))
        try:
            return await asyncio.shield(self._probe)
        except _NothingListensHere as exc:
            self.nothing_why = exc.why
            return False

    def close(self) -> None:
        self._reader.cancel()
        if self._probe is not None:
            self._probe.cancel()
        for future, _, _ in self.pending.values():
            if not future.done():
                future.set_exception(DevmgrError("this AsyncClient is closed"))
                future.exception()  # its waiter re-raises it; nothing left unretrieved
        self.pending.clear()
        if not self.sock.closed:
            self.sock.close(linger=0)
        if not self.ctx.closed:
            self.ctx.term()


class _NothingListensHere(Exception):
    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(why)


async def _probe(endpoint: str, deadline: float) -> bool:
    """Connect to `endpoint` and hang up: True when something listens, False undecided.

    Raises:
        _NothingListensHere: no socket file, a stale one, connection refused.
    """
    from devmgr import _zmtp

    if not _zmtp.supported(endpoint):
        return False
    _family, address = _zmtp._address(endpoint)
    wait = max(0.001, deadline - time.monotonic())
    try:
        if isinstance(address, str):
            opening = asyncio.open_unix_connection(address)
        else:
            opening = asyncio.open_connection(address[0], address[1])
        _, writer = await asyncio.wait_for(opening, wait)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise _NothingListensHere(_zmtp._nothing_listens(endpoint, exc).why) from None
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


def _hashable(value: object) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


class AsyncClient:
    """`Client`'s methods as coroutines: the same arguments, results and exceptions.

    Built on `zmq.asyncio`; any number of calls may run at once from one client (each
    reply is matched to its request by id). A short request waits at most `timeout`
    seconds; a long one (LONG_COMMANDS) as long as the manager shows it is alive, as
    `Client` does. The connection belongs to the event loop of the first call: use one
    AsyncClient per loop. `close()` is a plain method (no I/O to wait for): requests
    still waiting raise DevmgrError, event streams end. Also `async with`.

    Args:
        endpoint: the manager's control endpoint; None resolves it as the CLI does.
        timeout: seconds to wait for a reply (for a long command: for a sign of life).
        curve: `(client_secret_cert, server_public_cert)` certificate file paths.

    Raises:
        ControlError: the manager answered with an error (`.code`, `.message`).
        ManagerUnreachable: no reply within `timeout`, or nothing listens there.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = 5.0,
        curve: CurvePair | None = None,
    ) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.timeout = float(timeout)
        self._curve_keys = _load_curve_keys(curve) if curve is not None else None
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self._conn: _Connection | None = None
        self._closed = False
        self._streams: set[AsyncEventStream] = set()
        #: Called with a short text while a long command is under way (as Client's).
        self.on_progress: Callable[[str], None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def curve_keys(self) -> tuple[bytes, bytes, bytes] | None:
        """(client public, client secret, server public) when CURVE is used, else None."""
        return self._curve_keys

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection and end its event streams; waiting requests raise."""
        self._closed = True
        for stream in list(self._streams):
            stream.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> _Connection:
        if self._closed:
            raise DevmgrError("this AsyncClient is closed")
        conn = self._conn
        loop = asyncio.get_running_loop()
        if conn is not None and (conn.loop is not loop or (conn.stale and not conn.pending)):
            # Another loop (a new asyncio.run), or a timed-out request may still sit in
            # the queue: a new connection drops it, as Client does.
            if conn.loop is loop or conn.loop.is_closed():
                conn.close()
            self._conn = conn = None
        if conn is None:
            conn = self._conn = _Connection(self.endpoint, self._curve_keys)
        return conn

    def _take_id(self) -> int:
        request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFFFFFF
        return request_id

    # ---- the request -------------------------------------------------------------------

    async def _exchange(
        self, cmd: str, args: Mapping[str, Any] | None, wait: float, long: bool = False
    ) -> Any:
        """Send one request; return its reply (a dict), or raise ManagerUnreachable."""
        conn = self._connection()
        slots = conn.long_slots if long else conn.short_slots
        async with slots:
            return await self._exchange_on(conn, cmd, args, wait)

    async def _exchange_on(
        self, conn: _Connection, cmd: str, args: Mapping[str, Any] | None, wait: float
    ) -> Any:
        request_id = self._take_id()
        message: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "cmd": cmd}
        if args:
            message["args"] = dict(args)
        import json

        payload = json.dumps(message).encode()
        deadline = time.monotonic() + wait
        future = conn.submit(request_id, payload)
        try:
            listening = await conn.listens(deadline)
            if listening is False:
                raise ManagerUnreachable(
                    f"no devmgr manager at {conn.endpoint}: nothing listens there "
                    f"({conn.nothing_why})",
                    listening=False,
                )
            if await conn.send(payload, deadline):
                try:
                    return await asyncio.wait_for(
                        asyncio.shield(future), max(0.0, deadline - time.monotonic())
                    )
                except TimeoutError:
                    pass
            conn.stale = True
            why = f"no reply from a devmgr manager at {conn.endpoint} in {wait:g}s"
            if listening or conn.reached:
                why += ": something listens there but did not answer (a stopped manager?)"
            raise ManagerUnreachable(why, listening=True if (listening or conn.reached) else None)
        finally:
            conn.forget(request_id)
            if not future.done():
                future.cancel()

    async def request(
        self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request and return its `result` (as Client.request).

        Raises:
            ControlError: an error reply.
            ManagerUnreachable: nothing listens, or no reply (for a long command: no sign
                of life) within `timeout` (default: the client's).
        """
        wait = self.timeout if timeout is None else float(timeout)
        if cmd in LONG_COMMANDS:
            reply = await self._follow(cmd, args, wait)
        else:
            reply = await self._exchange(cmd, args, wait)
        if reply.get("ok") is True:
            return reply.get("result")
        error = reply.get("error")
        if not isinstance(error, dict):
            raise ControlError("internal", f"malformed error reply: {reply!r}")
        raise ControlError(str(error.get("code")), str(error.get("message", "")))

    async def _follow(self, cmd: str, args: Mapping[str, Any] | None, wait: float) -> Any:
        """A long command: wait for its reply while status probes show the manager alive."""
        started = time.monotonic()
        follower = _Follower(self, cmd, args, wait)  # type: ignore[arg-type]
        # the answer may take longer than `wait`: the probes bound the silence instead
        task = asyncio.ensure_future(self._exchange(cmd, args, 365 * 86400.0, long=True))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=follower.interval)
                if done:
                    return task.result()
                try:
                    probe = await self._exchange("status", follower.probe_args, wait)
                except ManagerUnreachable as exc:
                    if exc.listening is False:
                        raise
                    if self._conn is not None:
                        self._conn.stale = True
                    raise ManagerUnreachable(
                        f"no reply from a devmgr manager at {self.endpoint}: it stopped "
                        f"answering while `{cmd}` was under way (no sign of life for "
                        f"{wait:g}s, after {time.monotonic() - started:.1f}s)",
                        listening=True,
                    ) from None
                follower.probes += 1
                result = probe.get("result")
                if probe.get("ok") is True and isinstance(result, dict):
                    follower._progress(result.get("devices"))
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, DevmgrError):
                    pass

    # ---- one method per command (as Client's) --------------------------------------------

    async def ping(self) -> str:
        """Return "pong" when the manager answers."""
        return str(await self.request("ping"))

    async def version(self) -> dict[str, Any]:
        """Return `{"version": ..., "protocol": 1}` of the manager."""
        return dict(await self.request("version"))

    async def status(self, *names: str) -> dict[str, Any]:
        """Return `{"manager": {...}, "devices": [...]}` for the named devices (default all)."""
        return dict(await self.request("status", {"names": list(names)} if names else None))

    async def start(self, *names: str) -> list[dict[str, Any]]:
        """Start the named devices (`"*"` = all); return their status once started."""
        return list(await self.request("start", {"names": _names(names)}))

    async def stop(self, *names: str) -> list[dict[str, Any]]:
        """Stop the named devices (`"*"` = all); return their status once stopped."""
        return list(await self.request("stop", {"names": _names(names)}))

    async def restart(self, *names: str, rolling: bool = False) -> list[dict[str, Any]]:
        """Restart the named devices (`"*"` = all); return their status once running.

        `rolling`: one at a time in dependency order (as `Client.restart`).
        """
        args: dict[str, Any] = {"names": _names(names)}
        if rolling:
            args["rolling"] = True
        return list(await self.request("restart", args))

    async def pause(self, name: str) -> dict[str, Any]:
        """Pause a device (its loop stops reading); return its status."""
        return dict(await self.request("pause", {"name": name}))

    async def resume(self, name: str) -> dict[str, Any]:
        """Resume a paused device; return its status."""
        return dict(await self.request("resume", {"name": name}))

    async def stats(self, name: str) -> dict[str, int]:
        """Return the device's 8 STATISTICS counters by their `stats()` keys."""
        return dict(await self.request("stats", {"name": name}))

    async def logs(self, name: str, lines: int = 50, after: int | None = None) -> dict[str, Any]:
        """Return a device's stderr lines from the manager's buffer (as Client.logs)."""
        args: dict[str, Any] = {"name": name, "lines": lines}
        if after is not None:
            args["after"] = after
        return dict(await self.request("logs", args))

    async def add(self, spec: Any) -> dict[str, Any]:
        """Add and start a device from a `DeviceSpec` or a dict with `name`; return its status."""
        return dict(await self.request("add", {"spec": _spec_data(spec)}))

    async def remove(self, name: str) -> None:
        """Stop a device and forget it."""
        await self.request("remove", {"name": name})

    async def reload(self, config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Re-read the manager's config file; return its path and the names by change."""
        if config is None:
            return dict(await self.request("reload"))
        return dict(await self.request("reload", {"config": os.path.abspath(config)}))

    async def shutdown(self) -> None:
        """Stop every device, then the manager; return once the devices have stopped."""
        await self.request("shutdown")

    def events(
        self, devices: list[str] | None = None, kinds: list[str] | None = None
    ) -> AsyncEventStream:
        """The manager's events as an async iterator of event dicts (docs/events.md).

        `async for event in client.events(kinds=["device.exited"]): ...`. `devices`
        keeps the events of those devices; `kinds` the topics (or topic prefixes such as
        `device.`) to subscribe to. The stream ends when it or the client is closed.
        """
        from devmgr._events import AsyncEventStream

        async def events_endpoint() -> str:
            return connectable((await self.status())["manager"]["events"])

        stream = AsyncEventStream(
            events_endpoint, self._curve_keys, devices, kinds, self._streams.discard
        )
        self._streams.add(stream)
        return stream
