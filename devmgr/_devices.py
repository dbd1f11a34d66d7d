"""pyzmq's device API on devmgr's loop: `monitored_queue` and the device classes.

The classes subclass pyzmq's own (`zmq.devices.MonitoredQueue` and friends), so code
written for pyzmq switches by changing the import, and `isinstance` checks still hold.
They add a control channel: every device binds a ROUTER on a private ipc path, and
`stop()`, `pause()`, `resume()`, `stats()` and `ping()` reach it from any thread, or
from the parent of a process device, each through a short-lived socket of its own.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import zmq
import zmq.devices

from devmgr import _core
from devmgr._wire import STAT_KEYS, parse_stats

__all__ = [
    "STAT_KEYS",
    "Device",
    "MonitoredQueue",
    "ProcessDevice",
    "ProcessMonitoredQueue",
    "ThreadDevice",
    "ThreadMonitoredQueue",
    "monitored_queue",
    "parse_stats",
    "seed_routing_ids",
]

# How often a waiting control call checks that the device is still there.
_POLL_SLICE_MS = 50


def monitored_queue(  # noqa: PLR0917  (pyzmq's positional signature)
    in_socket: zmq.Socket[Any],
    out_socket: zmq.Socket[Any],
    mon_socket: zmq.Socket[Any] | None,
    in_prefix: bytes = b"in",
    out_prefix: bytes = b"out",
    ctrl_socket: zmq.Socket[Any] | None = None,
) -> None:
    """Relay between two sockets, copying every message to a monitor; pyzmq's drop-in.

    Same semantics as `zmq.devices.monitored_queue`: both directions are relayed, each
    message goes to `mon_socket` behind `in_prefix` or `out_prefix`, ROUTER to ROUTER
    swaps the two identity frames, and context termination raises
    `zmq.ContextTerminated`. With `ctrl_socket`, the loop also takes PAUSE, RESUME,
    TERMINATE (drain, answer OK, return), STATISTICS and PING.

    Raises:
        TypeError: a prefix is a str (encode it).
        zmq.ContextTerminated: the sockets' context was terminated.
    """
    _core.proxy(in_socket, out_socket, mon_socket, ctrl_socket, in_prefix, out_prefix)


def seed_routing_ids() -> None:
    """Seed libc's rand() from os.urandom, so this process's ROUTER peer ids are its own.

    libzmq (4.3.5, the copy pyzmq's wheels bundle) starts a new ROUTER's automatic peer
    routing ids at a value drawn from libc's rand(), which it never seeds: every fresh
    process gives its first peer the same id (0x006b8b4567 with glibc), its second the
    next, and so on. When a process that serves ROUTER (or REP) sockets restarts while its
    peers live on, a reply a connecting worker still holds for the old process's client
    is delivered to whichever client now has that id. devmgr seeds every device process
    it starts (the manager's devices, ProcessMonitoredQueue, ProcessDevice); an in-process
    device (ThreadMonitoredQueue, monitored_queue, ...) runs in your process, so call this
    once yourself, before the process makes its first socket, when that process is
    restarted while its peers stay up. It reseeds libc's rand() for the whole process
    (through the libc that pyzmq's libzmq calls), so skip it if something there relies on
    rand()'s default sequence.
    """
    _core.seed_routing_ids()


def _check_prefix(name: str, value: object) -> None:
    if isinstance(value, str):
        raise TypeError(f"{name} must be bytes, not str (encode it)")


def _private_ipc_dir() -> str:
    """Make a 0700 folder for a device's control socket, short enough for sun_path."""
    base = tempfile.gettempdir()
    if len(base) > 60:  # sun_path holds 107 bytes; keep room for the name
        base = "/tmp"
    return tempfile.mkdtemp(prefix="devmgr-", dir=base)


def _remove_private_dir(path: str, owner_pid: int) -> None:
    """Remove a device's control folder, in the process that made it only.

    A forked child inherits its parent's finalizers; when it exits it must not pull the
    control socket from under a device its parent still runs.
    """
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


class _Controlled:
    """What devmgr adds to a pyzmq device: the loop, a control channel, signals.

    Mixed in before pyzmq's classes, whose attributes (`_context`, `_sockets`,
    `launcher`, `done`, ...) it relies on.
    """

    #: Seconds the loop spends draining after TERMINATE or SIGTERM before it returns.
    drain_timeout: float = 1.0
    #: Seconds both directions of a two-way device must stay idle before a drain ends
    #: (any message read starts it over), so replies to requests in flight get back.
    #: Raise it above the slowest server's reply time; drain_timeout still caps it.
    drain_quiet: float = 0.1
    #: Milliseconds a process device lets queued messages reach peers before it exits
    #: (used for sockets without a LINGER of their own, so that a child always ends).
    linger: int = 1000

    # supplied by pyzmq's classes
    done: bool
    launcher: Any
    in_type: int
    _context: zmq.Context[Any]
    _sockets: list[zmq.Socket[Any]]
    _in_sockopts: list[tuple[int, Any]]
    if TYPE_CHECKING:  # methods of pyzmq's classes, which follow this one in the MRO

        def run_device(self) -> None: ...
        def join(self, timeout: float | None = None) -> None: ...
        def _setup_sockets(self) -> Any: ...

    _ctrl_dir: str | None = None
    _ctrl_endpoint: str | None = None
    _ctrl_cleanup: weakref.finalize[[str, int], _Controlled] | None = None
    _in_child: bool = False

    # --- running (in the device's thread or process) ---------------------------------

    def _prepare_control(self) -> None:
        if self._ctrl_endpoint is not None:
            raise RuntimeError("a device can be started once")
        self._ctrl_dir = _private_ipc_dir()
        self._ctrl_endpoint = f"ipc://{self._ctrl_dir}/ctrl"
        # A daemon thread device nobody stops, or a killed process device nobody joins,
        # never reaches _finish: remove the folder when the device object goes, or at
        # interpreter exit, whichever comes first.
        self._ctrl_cleanup = weakref.finalize(
            self, _remove_private_dir, self._ctrl_dir, os.getpid()
        )

    def _subscribe_all(self, ins: zmq.Socket[Any]) -> None:
        # A SUB input without a subscription would forward nothing, never what is meant.
        if self.in_type == zmq.SUB and not any(o == zmq.SUBSCRIBE for o, _ in self._in_sockopts):
            ins.setsockopt(zmq.SUBSCRIBE, b"")

    def _control_socket(self) -> zmq.Socket[Any]:
        ctrl: zmq.Socket[Any] = self._context.socket(zmq.ROUTER)
        self._sockets.append(ctrl)
        ctrl.linger = 1000  # the OK to TERMINATE must get out before the context ends
        assert self._ctrl_endpoint is not None
        ctrl.bind(self._ctrl_endpoint)
        return ctrl

    def _run_loop(
        self,
        ins: zmq.Socket[Any],
        outs: zmq.Socket[Any],
        mons: zmq.Socket[Any] | None,
        in_prefix: bytes = b"in",
        out_prefix: bytes = b"out",
        *,
        swap_ids: bool = True,
    ) -> None:
        self._subscribe_all(ins)
        ctrl = self._control_socket()
        with _SignalWakeup(drain_on_term=self._in_child) as wakeup_fd:
            _core.proxy(
                ins,
                outs,
                mons,
                ctrl,
                in_prefix,
                out_prefix,
                signal_fd=wakeup_fd,
                drain_timeout=self.drain_timeout,
                drain_quiet=self.drain_quiet,
                # A process device drains on SIGTERM/SIGINT (its handlers are no-ops); in
                # the user's own thread the user's handlers decide, as with pyzmq.
                drain_on_signals=self._in_child,
                swap_ids=swap_ids,
            )

    def run(self) -> None:
        """Run the device in this thread; context termination ends it quietly, as pyzmq's."""
        try:
            self.run_device()
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.ETERM, zmq.ENOTSOCK):
                raise
        finally:
            self.done = True
            self._finish()

    def _finish(self) -> None:
        if self._in_child:
            # A process device ends its own context so queued messages reach the peers,
            # within a bounded linger, before the process exits.
            for sock in self._sockets:
                if not sock.closed:
                    own = int(sock.getsockopt(zmq.LINGER))
                    sock.close(linger=own if own >= 0 else self.linger)
            context = getattr(self, "_context", None)
            if context is not None:
                context.term()
        else:
            for sock in self._sockets:
                if not sock.closed:
                    sock.close()
        self._remove_ctrl_dir()

    def _remove_ctrl_dir(self) -> None:
        if self._ctrl_dir is not None:
            # also from a process device's own child, which did not make the folder
            shutil.rmtree(self._ctrl_dir, ignore_errors=True)
        if self._ctrl_cleanup is not None:
            self._ctrl_cleanup()  # done: nothing left for the finalizer at exit

    # --- controlling (from any thread, or the parent process) -------------------------

    def _has_ended(self) -> bool:
        launcher = getattr(self, "launcher", None)
        if launcher is None:
            return self.done
        return not launcher.is_alive() and (
            getattr(launcher, "exitcode", None) is not None or self.done
        )

    def _request(self, command: bytes, timeout: float | None) -> list[bytes]:
        """Send one command on a fresh DEALER and return the loop's reply.

        A socket per call keeps no state between calls (no stale replies, nothing to
        clean up) and lives in a context of its own, never the device's or the user's,
        so terminating those contexts is never held up by it.
        """
        if self._ctrl_endpoint is None:
            raise RuntimeError("the device has not been started")
        deadline = None if timeout is None else time.monotonic() + timeout
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(self._ctrl_endpoint)
            sock.send(command)
            while True:
                wait_ms = _POLL_SLICE_MS
                if deadline is not None:
                    wait_ms = max(0, min(wait_ms, int((deadline - time.monotonic()) * 1000)))
                if sock.poll(wait_ms):
                    return sock.recv_multipart()
                if self._has_ended():
                    raise RuntimeError(f"the device is not running (no answer to {command!r})")
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"the device did not answer {command!r} in {timeout}s")
        finally:
            ctx.destroy(linger=0)

    def _expect_ok(self, command: bytes, timeout: float | None) -> None:
        reply = self._request(command, timeout)
        if reply != [b"OK"]:
            raise RuntimeError(f"unexpected reply to {command!r}: {reply!r}")

    def pause(self, timeout: float | None = None) -> None:
        """Stop reading both sockets (messages wait in the peers' queues); return once done.

        Raises:
            RuntimeError: the device is not running.
            TimeoutError: no answer within `timeout` seconds.
        """
        self._expect_ok(b"PAUSE", timeout)

    def resume(self, timeout: float | None = None) -> None:
        """Read both sockets again after `pause()`; return once the loop has answered."""
        self._expect_ok(b"RESUME", timeout)

    def stats(self, timeout: float | None = None) -> dict[str, int]:
        """Return the loop's 8 counters (whole messages and bytes, per socket) by STAT_KEYS."""
        return parse_stats(self._request(b"STATISTICS", timeout))

    def ping(self, timeout: float | None = None) -> bool:
        """Return True when the loop answers PING with PONG."""
        return self._request(b"PING", timeout) == [b"PONG"]

    def stop(self, timeout: float | None = None) -> None:
        """Drain and end the device: TERMINATE, wait for the loop's OK, then join.

        Works for every variant, a process device included (from its parent).

        Raises:
            RuntimeError: the device was never started.
            TimeoutError: the device had not ended after `timeout` seconds.
        """
        if self._ctrl_endpoint is None:
            raise RuntimeError("the device has not been started")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._has_ended():
            try:
                self._expect_ok(b"TERMINATE", timeout)
            except RuntimeError:
                if not self._has_ended():
                    raise
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.join(remaining)
        if not self._has_ended():
            raise TimeoutError(f"the device did not end within {timeout}s")


class _SignalWakeup:
    """Route signals to the loop through Python's wakeup fd, in a main thread only.

    A signal may be delivered to a thread other than the one in zmq_poll; the wakeup
    fd makes the loop run Python's handlers promptly either way. In a process device
    SIGTERM and SIGINT get no-op handlers, so their bytes make the loop drain and
    return (exit status 0) instead of killing the process mid-message. Elsewhere the
    user's handlers alone decide whether a signal ends the device (by raising).
    """

    def __init__(self, drain_on_term: bool) -> None:
        self._drain_on_term = drain_on_term
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._previous_fd = -1
        self._previous_handlers: list[tuple[int, Any]] = []

    def __enter__(self) -> int:
        if threading.current_thread() is not threading.main_thread():
            return -1
        read_end, write_end = socket.socketpair()
        read_end.setblocking(False)
        write_end.setblocking(False)
        previous = signal.set_wakeup_fd(write_end.fileno(), warn_on_full_buffer=False)
        # An event loop of ours owns the wakeup fd: leave it to it. (A process device's
        # child may have inherited its parent's, which means nothing there: take over.)
        if previous != -1 and not self._drain_on_term:
            signal.set_wakeup_fd(previous)
            read_end.close()
            write_end.close()
            return -1
        self._pair = (read_end, write_end)
        self._previous_fd = previous  # handed back on exit
        if self._drain_on_term:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers.append((signum, signal.signal(signum, _ignore_signal)))
        return read_end.fileno()

    def __exit__(self, *exc_info: object) -> None:
        if self._pair is None:
            return
        for signum, handler in self._previous_handlers:
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        for end in self._pair:
            end.close()


def _ignore_signal(signum: int, frame: object) -> None:
    """Do nothing: the signal's wakeup byte is what tells the loop to drain."""


class _ProcessLaunch(_Controlled):
    """Launch in a child process; the child builds its own context after it starts."""

    #: multiprocessing start method (None: the platform default, as pyzmq's).
    start_method: str | None = None

    def start(self) -> None:
        """Start the device in a new process."""
        self._prepare_control()
        mp: Any = multiprocessing.get_context(self.start_method)
        self.launcher = mp.Process(target=self._child_main)
        self.launcher.daemon = getattr(self, "daemon", True)
        self.launcher.start()

    def _child_main(self) -> None:
        self._in_child = True
        # before the device's first socket: a forked child would otherwise repeat the
        # parent's rand() sequence, and a fresh one glibc's default (seed_routing_ids)
        seed_routing_ids()
        self.run()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the process to end (up to `timeout` seconds), like Process.join."""
        self.launcher.join(timeout=timeout)
        if self.launcher.exitcode is not None:
            self._remove_ctrl_dir()  # in case the child could not (killed)

    def __getstate__(self) -> dict[str, Any]:
        # for spawn/forkserver: the child needs the configuration, not our runtime state
        state = dict(self.__dict__)
        for runtime in ("launcher", "_context", "_sockets", "_ctrl_cleanup"):
            state.pop(runtime, None)
        state["_sockets"] = []
        return state


class _ThreadLaunch(_Controlled):
    def start(self) -> None:
        """Start the device in a new thread."""
        self._prepare_control()
        super().start()  # type: ignore[misc]  # pyzmq's BackgroundDevice.start, via the MRO


class _ForegroundLaunch(_Controlled):
    def start(self) -> None:
        """Run the device in this thread until it is stopped (from another thread)."""
        self._prepare_control()
        self.run()


class _MonitoredQueueRunner(_Controlled):
    _in_prefix: bytes
    _out_prefix: bytes

    def __init__(
        self,
        in_type: int,
        out_type: int,
        mon_type: int = zmq.PUB,
        in_prefix: bytes = b"in",
        out_prefix: bytes = b"out",
    ) -> None:
        _check_prefix("in_prefix", in_prefix)  # fail here, not later in the device
        _check_prefix("out_prefix", out_prefix)
        super().__init__(in_type, out_type, mon_type, in_prefix, out_prefix)  # type: ignore[call-arg]

    def run_device(self) -> None:
        """Build the three sockets and run the loop with the monitor."""
        ins, outs, mons = self._setup_sockets()
        self._run_loop(ins, outs, mons, self._in_prefix, self._out_prefix)


class _PlainRunner(_Controlled):
    def run_device(self) -> None:
        """Build the two sockets and run the loop without a monitor."""
        ins, outs = self._setup_sockets()
        # pyzmq's plain devices run zmq.proxy, which never swaps ROUTER identities
        self._run_loop(ins, outs, None, swap_ids=False)


class MonitoredQueue(_MonitoredQueueRunner, _ForegroundLaunch, zmq.devices.MonitoredQueue):
    """pyzmq's MonitoredQueue on devmgr's loop, run in the calling thread by `start()`."""


class ThreadMonitoredQueue(_MonitoredQueueRunner, _ThreadLaunch, zmq.devices.ThreadMonitoredQueue):
    """pyzmq's ThreadMonitoredQueue on devmgr's loop, plus stop/pause/resume/stats."""


class ProcessMonitoredQueue(
    _MonitoredQueueRunner, _ProcessLaunch, zmq.devices.ProcessMonitoredQueue
):
    """pyzmq's ProcessMonitoredQueue on devmgr's loop; stoppable from the parent."""


class Device(_PlainRunner, _ForegroundLaunch, zmq.devices.Device):
    """A queue, forwarder or streamer (pyzmq's Device) on devmgr's loop, in this thread.

    `Device(zmq.FORWARDER, zmq.SUB, zmq.PUB)`: a SUB in-socket subscribes to everything
    unless a subscription was set with `setsockopt_in`.
    """


class ThreadDevice(_PlainRunner, _ThreadLaunch, zmq.devices.ThreadDevice):
    """pyzmq's ThreadDevice on devmgr's loop, plus stop/pause/resume/stats."""


class ProcessDevice(_PlainRunner, _ProcessLaunch, zmq.devices.ProcessDevice):
    """pyzmq's ProcessDevice on devmgr's loop; stoppable from the parent."""
