"""Type stub of devmgr's native core (core/_core.pyx, compiled into devmgr._core)."""

from typing import Any

import zmq

def proxy(
    in_socket: zmq.Socket[Any],
    out_socket: zmq.Socket[Any],
    mon_socket: zmq.Socket[Any] | None = None,
    ctrl_socket: zmq.Socket[Any] | None = None,
    in_prefix: bytes = b"in",
    out_prefix: bytes = b"out",
    *,
    signal_fd: int | None = -1,
    drain_timeout: float | None = 1.0,
    drain_quiet: float = 0.1,
    drain_on_signals: bool = True,
    swap_ids: bool = True,
) -> None:
    """Relay messages between two sockets until TERMINATE, a stop signal or ETERM.

    Both directions are relayed (a direction whose source cannot receive or whose
    destination cannot send, e.g. a FORWARDER's PUB side, is skipped); each whole
    message is copied to `mon_socket` behind its direction's prefix frame; ROUTER to
    ROUTER swaps the two identity frames (monitored_queue's way) unless `swap_ids` is
    False (zmq.proxy's way, pyzmq's plain devices). `ctrl_socket` takes PAUSE, RESUME,
    TERMINATE, STATISTICS and PING (docs/protocol.md), and is served while draining too.

    `signal_fd` (-1 or None: none; non-blocking, like the fd given to set_wakeup_fd):
    readable -> run Python's signal handlers; with `drain_on_signals` (default), a
    SIGTERM or SIGINT byte also drains and returns like TERMINATE, unanswered; without
    it, only the handlers decide.
    `drain_timeout`: seconds a drain may last, whether TERMINATE or a stop signal began
    it (None or inf: until done). `drain_quiet`: with both directions relayed, a drain ends
    only once both have been idle this long (capped by drain_timeout), so replies to
    forwarded requests get back; it reads the requests side (the in-socket, or the
    out-socket when only it is a ROUTER) only until that first gives EAGAIN.

    Returns None after TERMINATE or a SIGTERM/SIGINT byte, once drained.

    Raises:
        zmq.ContextTerminated: a socket's context was terminated (as pyzmq's loops).
        TypeError: a prefix is a str, or a socket is not a zmq socket.
        ValueError: neither direction can be relayed between these socket types, a bad
            drain_timeout or drain_quiet, or a blocking signal_fd.
        OSError: signal_fd is not an open file descriptor.
        zmq.ZMQError: ENOTSOCK for a closed socket (as pyzmq); any other libzmq error
            (a wrong socket type, say).
        BaseException: whatever a Python signal handler raised.
    """

def seed_routing_ids() -> None:
    """Seed libc's rand() (as libzmq calls it) from os.urandom: a new ROUTER's peer ids
    start at a value of its own instead of glibc's unseeded 0x006b8b4567."""

def libzmq_path() -> str | None:
    """Return the file of the libzmq whose functions the loop calls."""

def libzmq_version() -> tuple[int, int, int]:
    """Return the (major, minor, patch) version of that libzmq."""

LIBZMQ_SUPPORTED: tuple[tuple[int, int, int], tuple[int, int, int]]

def check_libzmq_version(version: tuple[int, ...], path: str | None = None) -> None:
    """Raise ImportError unless the core was written for this libzmq version (checked
    at import against zmq_version())."""
