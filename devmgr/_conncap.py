"""A bound on the connections a bound zmq socket of the manager holds (issue 11 part 4).

libzmq accepts every connection a listener gets and keeps one that never completes its
handshake for ZMQ_HANDSHAKE_IVL (30 s by default); it has no cap on their number. A flood
of handshake-less connections to the control port (CURVE or not) so costs the manager an
fd each, until spawns fail and the next accept aborts libzmq on EMFILE. The manager sets
a short handshake interval and watches the socket's monitor: beyond `limit` connections
it closes the oldest one still in its handshake (or, when every one is past it, the new
one) with shutdown(2), which libzmq sees as the peer going away and cleans up itself.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("devmgr")

#: Connections each of the manager's control and events sockets keeps at once.
MAX_CONNECTIONS = 64
#: Milliseconds a new connection has to complete its ZMTP (and CURVE) handshake.
HANDSHAKE_IVL_MS = 5000
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
_BURST = 1000


class ConnectionCap:
    """Keep `sock` (bound, on `loop`) at `limit` connections or fewer."""

    def __init__(self, loop: Any, sock: zmq.Socket[Any], limit: int = MAX_CONNECTIONS) -> None:
        self.loop = loop
        self.sock = sock
        self.limit = limit
        self.closed = 0  # connections cut because the socket was at its limit
        self._pending: dict[int, None] = {}  # fds in their handshake, oldest first
        self._done: set[int] = set()
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ipc_path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None
        self._port = None if self._ipc_path is not None else int(endpoint.rsplit(":", 1)[1])
        self._monitor: zmq.Socket[Any] = sock.get_monitor_socket(_EVENTS)
        self._monitor.setsockopt(zmq.LINGER, 0)
        loop.add_reader(self._monitor, self._on_event)

    @property
    def connections(self) -> int:
        return len(self._pending) + len(self._done)

    def close(self) -> None:
        self.loop.remove_reader(self._monitor)
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)

    def _on_event(self) -> None:
        for _ in range(_BURST):
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = parse_monitor_message(frames)
            except Exception:  # pragma: no cover - libzmq sent something else
                continue
            fd, kind = int(event["value"]), event["event"]
            if kind == zmq.EVENT_ACCEPTED:
                self._pending[fd] = None
                self._done.discard(fd)
                if self.connections > self.limit:
                    self._evict(fd)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._pending.pop(fd, 0) is None:
                    self._done.add(fd)
            elif kind == zmq.EVENT_DISCONNECTED:
                self._pending.pop(fd, None)
                self._done.discard(fd)

    def _evict(self, newest: int) -> None:
        victim = next(iter(self._pending), newest)
        self._pending.pop(victim, None)
        self._done.discard(victim)
        if self._shutdown(victim):
            self.closed += 1
            if self.closed == 1 or self.closed % 1000 == 0:
                log.warning(
                    "%s has %d connections, its limit: closed one still in its handshake "
                    "(%d so far)",
                    self.sock.getsockopt_string(zmq.LAST_ENDPOINT),
                    self.limit,
                    self.closed,
                )

    def _shutdown(self, fd: int) -> bool:
        """shutdown(2) the connection `fd` if it still is one of this listener's."""
        try:
            conn = socket.socket(fileno=os.dup(fd))  # libzmq keeps its own fd
        except OSError:
            return False  # closed meanwhile
        try:
            local = conn.getsockname()
            if self._ipc_path is not None:
                ours = conn.family == socket.AF_UNIX and local == self._ipc_path
            else:
                ours = conn.family in (socket.AF_INET, socket.AF_INET6) and local[1] == self._port
            if ours:
                conn.shutdown(socket.SHUT_RDWR)
            return ours
        except OSError:
            return False
        finally:
            conn.close()
