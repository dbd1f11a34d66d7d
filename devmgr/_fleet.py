"""The devices a manager supervises: child processes, their control sockets, health.

Everything here runs on the manager's event loop thread. Each device pairs a
`Supervisor` (the state machine, no I/O) with the I/O that carries out its decisions:
spawning through the zygote, TERMINATE/SIGTERM/SIGKILL escalation, the exit
sentinel, and the health tick (a /proc sample plus a STATISTICS request through the
device's own loop, which doubles as the hang check).

Operations that take time (start, stop, restart, pause) are asynchronous: each returns
a `Pending` (devmgr._tasks) resolved when it is over. Operations on one device run one
after another, in the order they were asked for; operations on different devices run
side by side.
"""

from __future__ import annotations

import copy
import errno as errno_mod
import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import zmq

from devmgr import _child
from devmgr._devices import STAT_KEYS, parse_stats
from devmgr._devlog import EXIT_LINES, DeviceLog, StderrPipe, new_pipe
from devmgr._errors import ControlError, DevmgrError
from devmgr._fds import FdBudget
from devmgr._loop import EventLoop, Timer
from devmgr._paths import BoundFile, remove_dead_socket, safe_bind
from devmgr._procstat import ProcSampler
from devmgr._spec import DEFAULT_DRAIN_QUIET, DeviceSpec, SocketSpec, drain_budget
from devmgr._supervisor import Idle, Kill, Reason, Spawn, State, Supervisor, Terminate, Wait
from devmgr._tasks import Pending, gather, settled, spawn
from devmgr._zygote import ZYGOTE, Child

log = logging.getLogger("devmgr")

T = TypeVar("T")
Emit = Callable[..., None]

_ZERO_STATS = dict.fromkeys(STAT_KEYS, 0)
_MIB = 1 << 20
# Device control replies read per wake-up.
_CTRL_BURST = 1000
# Devices checked per loop turn by the health tick.
_HEALTH_SLICE = 16
# /proc samples (CPU %, RSS, fds) per health tick across the fleet: past this many devices
# each is sampled every few ticks, staggered, except those with a memory limit, which are
# sampled every tick. (At 1,000 devices sampling was a fifth of the idle manager's CPU.)
_SAMPLES_PER_TICK = 250
# Plain ints: pyzmq's flag enums cost an enum operation per call on the health path.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
# A child that has neither reported READY nor failed by then is treated as hung.
_READY_TIMEOUT = 10.0
# Seconds an exit with the start-failure status may wait for the child's FAILED report.
_REPORT_GRACE = 0.25
# Device processes forked per loop turn (each fork is a round trip to the zygote of
# ~1-5 ms): a start of 1,000 devices (or a restart storm)
# forks in slices, so control requests, READY reports and health replies are served
# between them instead of waiting for the last fork.
_SPAWN_SLICE = 4


def _socket_plan(spec: SocketSpec) -> _child.SocketPlan:
    return _child.SocketPlan(
        zmq_type=spec.zmq_type(),
        options=tuple(spec.zmq_options()),
        bind=tuple(spec.bind),
        connect=tuple(spec.connect),
    )


def device_plan(
    spec: DeviceSpec, stop_timeout: float, ipc_bind_dirs: tuple[str, ...] | None = None
) -> _child.DevicePlan:
    """Translate a validated spec into the plain values a child builds its sockets from."""
    # The drain and the linger of the child's sockets share the stop budget, so a device
    # asked to stop is gone before the manager's SIGKILL at stop_timeout. A longer quiet
    # period gets a drain long enough to wait it out after the last reply, within half of
    # stop_timeout (validated: drain_quiet is shorter than that).
    linger = max(0.05, min(1.0, stop_timeout * 0.4))
    quiet = DEFAULT_DRAIN_QUIET if spec.drain_quiet is None else spec.drain_quiet
    drain = max(linger, min(quiet + 0.5, drain_budget(stop_timeout)))
    return _child.DevicePlan(
        name=spec.name,
        in_=_socket_plan(spec.in_),
        out=_socket_plan(spec.out),
        mon=_socket_plan(spec.mon) if spec.mon is not None else None,
        in_prefix=spec.in_prefix.encode(),
        out_prefix=spec.out_prefix.encode(),
        drain_timeout=drain,
        drain_quiet=quiet,
        linger_ms=int(linger * 1000),
        kind=spec.kind,
        ipc_bind_dirs=ipc_bind_dirs,
    )


class Device:
    """One supervised device: its spec, its state machine and its current child."""

    def __init__(self, spec: DeviceSpec, supervisor: Supervisor, index: int) -> None:
        self.spec = spec
        self.sup = supervisor
        self.index = index
        self.gen = 0
        self.proc: Child | None = None  # the current child process
        self.ident: bytes | None = None  # routing id of the current child's control DEALER
        self.awaiting_ready = False
        self.pending: deque[Callable[[list[bytes] | None], None]] = deque()
        self.stats: dict[str, int] = dict(_ZERO_STATS)
        self.stats_at: float | None = None  # unix time the loop's counters were read
        self.cpu_percent: float | None = None
        self.rss_bytes: int | None = None
        self.num_fds: int | None = None
        self.sampler: ProcSampler | None = None
        self.stats_sent_at: float | None = None  # an unanswered STATISTICS, sent then
        self.timers: dict[str, Timer] = {}
        self.waiters: list[tuple[Callable[[Device], bool], Pending[None]]] = []
        self.last_op: Pending[Any] | None = None  # the newest operation: the next waits for it
        # the child's report of its last start failure: where, endpoint, errno, message
        self.failure: dict[str, Any] | None = None
        self.removed = False
        self.endpoints = spec.endpoints()  # the spec is frozen: compute once
        # (key of the values it was built from, status JSON without uptime and leading "{")
        self.json_cache: tuple[tuple[Any, ...], str] | None = None
        self.log = DeviceLog(spec.name)  # its stderr lines, across its processes
        self.stderr: StderrPipe | None = None  # the current child's stderr pipe
        self.exit_stderr: tuple[str, ...] = ()  # the last lines of the last exited process

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def message(self) -> str | None:
        """The last start failure, for status."""
        message = (self.failure or {}).get("message")
        return None if message is None else str(message)

    def cancel_timer(self, key: str) -> None:
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()


class Fleet:
    """All devices of one manager, driven from its event loop."""

    def __init__(
        self,
        loop: EventLoop,
        ctx: zmq.Context[zmq.Socket[bytes]],
        rundir: Path,
        emit: Emit,
        *,
        health_interval: float,
        stop_timeout: float,
        ipc_bind_dirs: tuple[Path, ...] | None = None,
    ) -> None:
        self.loop = loop
        self.ipc_bind_dirs = None if ipc_bind_dirs is None else tuple(str(d) for d in ipc_bind_dirs)
        self.ctx = ctx
        self.rundir = rundir
        self.emit = emit
        self.health_interval = health_interval
        self.stop_timeout = stop_timeout
        self.devices: dict[str, Device] = {}
        self._next_index = 0
        self._health_timer: Timer | None = None
        self._ctrl: zmq.Socket[bytes] | None = None
        self._ctrl_endpoint = f"ipc://{rundir / 'ctl'}"
        self._ctrl_file: BoundFile | None = None
        self._by_ident: dict[bytes, Device] = {}
        self._to_spawn: dict[Device, None] = {}  # in order, each device once
        self._ticks = 0
        self._sample_every = 1
        # the soft fd limit as the manager left it at start (raised to the hard one)
        self.fds = FdBudget()

    # ---- set-up ---------------------------------------------------------------------

    def prepare(self) -> None:
        """Start the zygote (once per process) and bind the children's control socket.

        A child forked from the zygote, which has devmgr._child preloaded, is ready in
        ~20 ms instead of ~110 ms for a fresh interpreter.
        """
        ZYGOTE.ensure_running()
        # One ROUTER serves every child's control channel: with a socket per device the
        # manager's poll set, and its idle CPU, would grow with the number of devices.
        ctrl = self.ctx.socket(zmq.ROUTER)
        try:
            ctrl.setsockopt(zmq.LINGER, 0)
            ctrl.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone child fails at once
            bound = safe_bind(ctrl, self._ctrl_endpoint, mode=0o600)
            assert bound is not None  # an ipc path of ours
            self._ctrl_file = BoundFile(ctrl, self._ctrl_endpoint, bound)
        except (zmq.ZMQError, OSError) as exc:
            ctrl.close(linger=0)
            raise DevmgrError(f"cannot bind {self._ctrl_endpoint}: {exc.strerror}") from exc
        self._ctrl = ctrl
        self.loop.add_reader(ctrl, self._on_ctrl)
        self._health_timer = self.loop.call_later(self.health_interval, self._health_tick)

    def add_device(self, spec: DeviceSpec) -> Device:
        if spec.name in self.devices:  # a live entry must be stopped before it is replaced
            raise ControlError("conflict", f"a device named {spec.name!r} exists already")
        sup = Supervisor(spec.name, spec.restart)
        dev = Device(spec, sup, self._next_index)
        self._next_index += 1
        self.devices[spec.name] = dev
        return dev

    def specs(self) -> dict[str, DeviceSpec]:
        """The specs of the devices that are not being removed."""
        return {name: dev.spec for name, dev in self.devices.items() if not dev.removed}

    # ---- serialised operations ------------------------------------------------------

    def serialised(
        self,
        dev: Device,
        op: Callable[[], Coroutine[Pending[Any], None, T]],
        *,
        when_removed: bool = False,
    ) -> Pending[T]:
        """Run `op()` once the device's earlier operations are over; return its outcome.

        An operation that comes to run once the device is being removed is answered
        `unknown_device` instead (the removal's own stop passes `when_removed`).
        """
        before = dev.last_op

        async def in_turn() -> T:
            if before is not None and not before.done():
                await settled(before)
                # Start in a loop turn of its own: a queue of operations that are over at
                # once would otherwise run as one ever deeper call stack, each finishing
                # operation starting the next (a few hundred were a RecursionError).
                await self._fresh_turn()
            if dev.removed and not when_removed:
                raise ControlError("unknown_device", f"{dev.name} was removed")
            return await op()

        outcome = spawn(in_turn())
        dev.last_op = outcome
        return outcome

    def _fresh_turn(self) -> Pending[None]:
        """Resolve at the start of the loop's next turn, with an empty call stack."""
        turn: Pending[None] = Pending()
        self.loop.call_soon_threadsafe(lambda: turn.set_result(None))
        return turn

    def until(self, dev: Device, pred: Callable[[Device], bool]) -> Pending[None]:
        """Resolve once `pred(dev)` holds (checked after each state change)."""
        pending: Pending[None] = Pending()
        if pred(dev):
            pending.set_result(None)
        else:
            dev.waiters.append((pred, pending))
        return pending

    def _changed(self, dev: Device) -> None:
        """Resolve the waits whose condition now holds (after any state change)."""
        if not dev.waiters:
            return
        ready = [w for w in dev.waiters if w[0](dev)]
        if ready:
            dev.waiters = [w for w in dev.waiters if not w[0](dev)]
            for _, pending in ready:
                pending.set_result(None)

    def start(self, dev: Device) -> Pending[None]:
        """Start a stopped, failed or backing-off device; resolved once running or failed."""

        async def op() -> None:
            if dev.sup.state in (State.RUNNING, State.PAUSED):
                return
            if dev.sup.state in (State.STOPPED, State.FATAL, State.BACKOFF):
                dev.cancel_timer("backoff")
                dev.failure = None
                self._act(dev, dev.sup.start())
            await self.until(dev, _settled_after_start)
            error = self._start_error(dev)
            if error is not None:
                raise error

        return self.serialised(dev, op)

    def _start_error(self, dev: Device) -> ControlError | None:
        if dev.sup.state in (State.RUNNING, State.PAUSED):
            return None
        failure = dev.failure or {}
        if failure.get("errno") in (errno_mod.EADDRINUSE, errno_mod.EEXIST):
            return ControlError("conflict", f"{dev.name}: {failure.get('message')}")
        message = failure.get("message") or (
            f"{dev.name} did not start ({dev.sup.state.value}"
            + (f", last exit {dev.sup.last_exit.as_dict()}" if dev.sup.last_exit else "")
            + ")"
        )
        return ControlError("invalid_spec", f"{dev.name}: {message}")

    def stop(self, dev: Device, *, when_removed: bool = False) -> Pending[None]:
        """Stop a device (drain, then escalate); resolved once no process runs."""

        async def op() -> None:
            dev.cancel_timer("backoff")
            before = dev.sup.state
            self._act(dev, dev.sup.stop())
            if dev.sup.state is State.STOPPED and before is not State.STOPPED:
                # from backoff or fatal: no exit will announce it
                self.emit("device.stopped", device=dev.name)
                self._remove_dead_sockets(dev)
            await self.until(dev, _no_process)

        return self.serialised(dev, op, when_removed=when_removed)

    def restart(self, dev: Device) -> Pending[None]:
        """Stop then start, as one operation (a manual restart clears FATAL)."""
        self.stop(dev)  # its outcome is the start's: the start runs after it either way
        return self.start(dev)

    def control(self, dev: Device, command: bytes) -> Pending[Any]:
        """Send PAUSE, RESUME or STATISTICS through the device's loop; resolve with the reply.

        STATISTICS gives the counters; PAUSE and RESUME the state they leave.
        """

        async def op() -> Any:
            reply = None
            if dev.sup.state in (State.RUNNING, State.PAUSED):
                reply = self._request(dev, command)
            if reply is None:
                raise ControlError("conflict", f"{dev.name} is {dev.sup.state.value}, not running")
            frames = await reply
            if frames is None:
                raise ControlError("conflict", f"{dev.name} exited before answering")
            if command == b"STATISTICS":
                self._take_stats(dev, frames)
                return dict(dev.stats)
            if frames != [b"OK"]:
                reply_text = b" ".join(frames)[:100].decode(errors="replace")
                raise ControlError("conflict", f"{dev.name} answered {reply_text}")
            before = dev.sup.state
            if command == b"PAUSE":
                dev.sup.paused()
            elif command == b"RESUME":
                dev.sup.resumed()
            if dev.sup.state is not before:  # a second PAUSE changes nothing
                topic = "device.paused" if command == b"PAUSE" else "device.resumed"
                self.emit(topic, device=dev.name, pid=dev.sup.pid)
            self._changed(dev)
            return dev.sup.state.value

        return self.serialised(dev, op)

    def remove(self, dev: Device) -> Pending[None]:
        """Stop the device and forget it; operations queued after this one are refused."""
        stopping = self.stop(dev, when_removed=True)
        dev.removed = True

        async def forget() -> None:
            try:
                await stopping
            finally:
                if self.devices.get(dev.name) is dev:
                    del self.devices[dev.name]

        return spawn(forget())

    def kill_all(self) -> Pending[None]:
        """SIGKILL every device process (a stop that ran out of time); resolved once all exited."""
        running = [dev for dev in self.devices.values() if dev.proc is not None]
        for dev in running:
            self._signal(dev, signal.SIGKILL)
        return gather(self.until(dev, lambda d: d.proc is None) for dev in running)

    # ---- carrying out supervisor decisions --------------------------------------------

    def _act(self, dev: Device, action: Spawn | Terminate | Kill | Wait | Idle) -> None:
        if isinstance(action, Spawn):
            self._spawn(dev)
        elif isinstance(action, Wait):
            self.emit("device.backoff", device=dev.name, delay=round(action.delay, 4))
            if action.delay <= 0:
                self._act(dev, dev.sup.backoff_elapsed())
            else:
                dev.timers["backoff"] = self.loop.call_later(
                    action.delay, lambda: self._backoff_elapsed(dev)
                )
        elif isinstance(action, Terminate):
            self._terminate(dev)
        elif isinstance(action, Kill):
            self._signal(dev, signal.SIGKILL)
        self._changed(dev)

    def _backoff_elapsed(self, dev: Device) -> None:
        dev.timers.pop("backoff", None)
        if not dev.removed:
            self._act(dev, dev.sup.backoff_elapsed())

    def keep_ctrl_file(self) -> bool:
        """Bind the device channel's socket file again if it was removed (rm -rf)."""
        return self._ctrl_file is None or self._ctrl_file.keep(log)

    def _spawn(self, dev: Device) -> None:
        """Fork the device's process soon: in a slice of at most _SPAWN_SLICE per turn."""
        if not self._to_spawn:
            self.loop.call_later(0, self._spawn_some)
        self._to_spawn[dev] = None

    def _spawn_some(self) -> None:
        for _ in range(min(_SPAWN_SLICE, len(self._to_spawn))):
            dev = next(iter(self._to_spawn))
            del self._to_spawn[dev]
            # still wanted: a stop (or removal) while it waited left STARTING
            if dev.sup.state is State.STARTING and dev.sup.pid is None:
                self._spawn_now(dev)
                self._changed(dev)
        if self._to_spawn:
            self.loop.call_later(0, self._spawn_some)

    def _spawn_now(self, dev: Device) -> None:
        if dev.removed:
            return
        refusal = self.fds.refusal()
        if refusal is not None:  # a failed start, before it could cost a running device
            log.error("could not start %s: %s", dev.name, refusal)
            dev.failure = {"message": refusal, "errno": errno_mod.EMFILE, "errname": "EMFILE"}
            self._act(dev, dev.sup.spawn_failed(refusal))
            return
        self.keep_ctrl_file()  # one lstat: a child must find the channel at its path
        dev.gen += 1
        dev.ident = f"{dev.index}.{dev.gen}".encode()
        self._by_ident[dev.ident] = dev
        dev.awaiting_ready = True
        dev.failure = None
        dev.stats = dict(_ZERO_STATS)
        dev.stats_at = None
        plan = device_plan(dev.spec, self.stop_timeout, self.ipc_bind_dirs)
        stderr_r, stderr_w = new_pipe()
        try:  # a zygote found dead is replaced on the way
            proc = ZYGOTE.spawn((plan, self._ctrl_endpoint, dev.ident), stderr_fd=stderr_w)
        except Exception as exc:  # the zygote could not be started or refused: a failed start
            os.close(stderr_r)
            log.error("could not spawn %s: %s", dev.name, exc)
            self._close_ctrl(dev)
            dev.failure = {"message": str(exc)}
            self._act(dev, dev.sup.spawn_failed(str(exc)))
            return
        finally:
            os.close(stderr_w)  # the child has its own copy
        dev.proc = proc
        pipe = dev.stderr = StderrPipe(stderr_r, proc.pid, dev.log)
        self.loop.add_reader(stderr_r, lambda: self._on_stderr(dev, pipe))
        dev.sup.spawned(proc.pid)
        dev.sampler = ProcSampler(proc.pid)
        self.loop.add_reader(proc.sentinel, lambda: self._on_exit(dev, proc))
        dev.timers["ready"] = self.loop.call_later(_READY_TIMEOUT, lambda: self._ready_overdue(dev))
        self.emit("device.starting", device=dev.name, pid=proc.pid)

    def _terminate(self, dev: Device) -> None:
        """Ask the loop to drain (TERMINATE), then SIGTERM, then SIGKILL at stop_timeout."""
        if dev.proc is None:
            return
        sent = False
        if not dev.awaiting_ready and dev.ident is not None:
            sent = self._send_ctrl(dev, b"TERMINATE", lambda frames: None)
        if not sent:
            self._signal(dev, signal.SIGTERM)
        else:
            dev.timers["sigterm"] = self.loop.call_later(
                self.stop_timeout * 0.8, lambda: self._signal(dev, signal.SIGTERM)
            )
        dev.timers["sigkill"] = self.loop.call_later(
            self.stop_timeout, lambda: self._signal(dev, signal.SIGKILL)
        )

    def _signal(self, dev: Device, signum: int) -> None:
        if dev.proc is not None:
            dev.proc.send_signal(signum)  # a no-op once the child is known to be gone

    def _ready_overdue(self, dev: Device) -> None:
        """The READY timer fired: unresponsive, unless the report is only unread yet."""
        dev.timers.pop("ready", None)
        self._on_ctrl()  # a busy manager, not the device, may be what is late
        if dev.sup.state is not State.STARTING:
            return
        if dev.awaiting_ready:
            self._unhealthy(dev, Reason.UNRESPONSIVE)
        else:  # READY was just read and the PING is out: give it a ping's time
            dev.timers["ready"] = self.loop.call_later(
                dev.spec.health.ping_timeout, lambda: self._unhealthy(dev, Reason.UNRESPONSIVE)
            )

    def _unhealthy(self, dev: Device, reason: Reason) -> None:
        if dev.proc is None or dev.sup.state not in (State.RUNNING, State.PAUSED, State.STARTING):
            return
        pid = dev.proc.pid
        action = dev.sup.unhealthy(reason)
        if isinstance(action, Kill):  # a second verdict before the exit says nothing new
            log.warning("%s (pid %s) is unhealthy: %s", dev.name, pid, reason.value)
            self.emit("device.unhealthy", device=dev.name, pid=pid, reason=reason.value)
        self._act(dev, action)

    # ---- child events -------------------------------------------------------------------

    def _on_ctrl(self) -> None:
        assert self._ctrl is not None
        for _ in range(_CTRL_BURST):  # then let the loop look at its other sockets
            try:
                ident, *frames = self._ctrl.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            dev = self._by_ident.get(ident)
            if dev is None or not frames:
                continue  # a late message from a child already gone
            if dev.awaiting_ready:
                self._on_child_report(dev, frames)
            elif dev.pending:
                dev.pending.popleft()(frames)

    def _on_child_report(self, dev: Device, frames: list[bytes]) -> None:
        if frames[0] == b"READY":
            dev.awaiting_ready = False
            # Running means: bound everything and answered through the loop itself.
            self._send_ctrl(dev, b"PING", lambda reply: self._on_first_pong(dev, reply))
        elif frames[0] == b"FAILED" and len(frames) == 2:
            try:
                dev.failure = json.loads(frames[1])
            except ValueError:
                dev.failure = {"message": frames[1].decode(errors="replace")}
            message = str((dev.failure or {}).get("message"))
            log.error("%s failed to start: %s", dev.name, message)
            dev.sup.start_failed(message)

    def _on_first_pong(self, dev: Device, reply: list[bytes] | None) -> None:
        if reply != [b"PONG"] or dev.proc is None:
            return
        dev.cancel_timer("ready")
        dev.sup.ready()
        if dev.sup.state is State.RUNNING:  # not when a stop began meanwhile
            self.emit("device.running", device=dev.name, pid=dev.proc.pid)
        self._changed(dev)

    def _on_stderr(self, dev: Device, pipe: StderrPipe) -> None:
        if not pipe.read():  # EOF: the child (and whatever shared its stderr) is gone
            self._close_stderr(dev, pipe)

    def _close_stderr(self, dev: Device, pipe: StderrPipe) -> None:
        if pipe.fd is not None:
            self.loop.remove_reader(pipe.fd)
        pipe.drain()  # the last lines, then close
        if dev.stderr is pipe:
            dev.stderr = None

    def _on_exit(self, dev: Device, proc: Child, *, waited: bool = False) -> None:
        exitcode = proc.poll()
        if exitcode is None:
            return
        # The child's last words (a FAILED report) may still wait on the control socket
        # when the sentinel wins the race: read them first, and what it wrote to stderr.
        self._on_ctrl()
        if exitcode == _child.EXIT_START_FAILED and dev.failure is None and not waited:
            # ...or still be inside libzmq on the way here (the child flushes it before it
            # exits, but our I/O thread may not have read it yet, under load): a conflict
            # told apart from a bad spec is worth a moment's wait for it
            self.loop.remove_reader(proc.sentinel)
            self.loop.call_later(_REPORT_GRACE, lambda: self._on_exit(dev, proc, waited=True))
            return
        self.loop.remove_reader(proc.sentinel)
        pid = proc.pid
        proc.close()
        if dev.stderr is not None and dev.stderr.pid == pid:
            self._close_stderr(dev, dev.stderr)
        dev.exit_stderr = tuple(dev.log.of_pid(pid, EXIT_LINES))
        if proc.lost:
            log.warning("%s (pid %s): the zygote died; the device died with it", dev.name, pid)
        if exitcode == _child.EXIT_START_FAILED and dev.failure is None:
            dev.failure = {"message": f"{dev.name} failed to set up its sockets"}
            dev.sup.start_failed(dev.failure["message"])
        code, sig = (None, -exitcode) if exitcode is not None and exitcode < 0 else (exitcode, None)
        self._after_exit(dev, code, sig, pid=pid)

    def _after_exit(self, dev: Device, code: int | None, sig: int | None, *, pid: int) -> None:
        for key in list(dev.timers):
            if key != "backoff":
                dev.cancel_timer(key)
        self._close_ctrl(dev)
        dev.proc = None
        if dev.sampler is not None:
            dev.sampler.close()
        dev.sampler = None
        dev.cpu_percent = dev.rss_bytes = dev.num_fds = None
        action = dev.sup.exited(code, sig, pid=pid or None)
        last = dev.sup.last_exit
        reason = last.reason.value if last else "exited"
        self.emit(
            "device.exited",
            device=dev.name,
            pid=pid,
            code=code,
            signal=sig,
            reason=reason,
            stderr=list(dev.exit_stderr),
        )
        if dev.sup.state is State.FATAL:
            self.emit("device.fatal", device=dev.name, reason=reason)
        elif dev.sup.state is State.STOPPED:
            self.emit("device.stopped", device=dev.name)
        if dev.sup.state in (State.STOPPED, State.FATAL):
            self._remove_dead_sockets(dev)
        self._act(dev, action)

    def _remove_dead_sockets(self, dev: Device) -> None:
        """Remove the ipc socket files of a device that no longer runs, once proven dead.

        A device that drains removes its own; one that was SIGKILLed (hung at its stop,
        crashed under policy `never`) cannot, and libzmq never does. Only sockets whose
        connect is refused go; a restart rebinds over them in any case.
        """
        for side in (dev.spec.in_, dev.spec.out, dev.spec.mon):
            for endpoint in side.bind if side is not None else ():
                path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else ""
                if path and not path.startswith(("@", "*")):
                    remove_dead_socket(path)

    def _close_ctrl(self, dev: Device) -> None:
        if dev.ident is not None:
            self._by_ident.pop(dev.ident, None)
            dev.ident = None
        dev.awaiting_ready = False
        dev.stats_sent_at = None
        pending, dev.pending = dev.pending, deque()
        for callback in pending:
            callback(None)

    def _send_ctrl(
        self, dev: Device, command: bytes, on_reply: Callable[[list[bytes] | None], None]
    ) -> bool:
        if dev.ident is None or dev.awaiting_ready or self._ctrl is None:
            return False
        try:
            self._ctrl.send(dev.ident, _MORE_NOBLOCK)
            self._ctrl.send(command, _NOBLOCK)
        except zmq.ZMQError:
            return False
        dev.pending.append(on_reply)
        return True

    def _request(self, dev: Device, command: bytes) -> Pending[list[bytes] | None] | None:
        """Send `command` to the device's loop; None when it cannot be sent.

        The reply resolves to None when the child exits before it answers.
        """
        reply: Pending[list[bytes] | None] = Pending()
        return reply if self._send_ctrl(dev, command, reply.set_result) else None

    # ---- health -------------------------------------------------------------------------

    def _health_tick(self) -> None:
        self._health_timer = self.loop.call_later(self.health_interval, self._health_tick)
        self._ticks += 1
        self._sample_every = -(-len(self.devices) // _SAMPLES_PER_TICK) or 1
        self._health_chunk(list(self.devices.values()), 0)

    def _health_chunk(self, devices: list[Device], start: int) -> None:
        """Check a slice of the devices, then yield to the loop before the next slice.

        Checking 200 devices in one turn would hold control replies for ~10 ms.
        """
        end = start + _HEALTH_SLICE
        # read the replies already queued first: a reply the manager was too busy to read
        # is not a hung device
        self._on_ctrl()
        now = self.loop.clock()
        for dev in devices[start:end]:
            if dev.removed or dev.proc is None:
                continue
            if dev.sup.state not in (State.RUNNING, State.PAUSED):
                continue
            limit = dev.spec.health.max_rss_mb
            if limit is not None or (dev.index + self._ticks) % self._sample_every == 0:
                self._sample(dev)
            if limit is not None and dev.rss_bytes is not None and dev.rss_bytes > limit * _MIB:
                self._unhealthy(dev, Reason.MEMORY)
                continue
            # The STATISTICS request doubles as the hang check: no answer within
            # ping_timeout, seen at the first tick after it, means unresponsive. (A timer
            # per device and tick would cost more than the check itself.)
            if dev.stats_sent_at is None:
                self._request_stats(dev, now)
            elif now - dev.stats_sent_at > dev.spec.health.ping_timeout:
                self._unhealthy(dev, Reason.UNRESPONSIVE)
        if end < len(devices):
            self.loop.call_later(0, lambda: self._health_chunk(devices, end))

    def _sample(self, dev: Device) -> None:
        sampler = dev.sampler
        if sampler is not None and sampler.sample():
            dev.cpu_percent = sampler.cpu_percent
            dev.rss_bytes = sampler.rss_bytes
            dev.num_fds = sampler.num_fds
        # else: it is exiting, and the sentinel will tell

    def _request_stats(self, dev: Device, now: float) -> None:
        def reply(frames: list[bytes] | None) -> None:
            dev.stats_sent_at = None
            if frames is not None:
                self._take_stats(dev, frames)

        if self._send_ctrl(dev, b"STATISTICS", reply):
            dev.stats_sent_at = now

    def _take_stats(self, dev: Device, frames: list[bytes]) -> None:
        try:
            dev.stats = parse_stats(frames)
            dev.stats_at = time.time()  # rates (devmgr top) divide by the time between reads
        except ValueError:
            pass  # not a STATISTICS reply: keep the last counters

    # ---- status -------------------------------------------------------------------------

    def status_of(self, dev: Device) -> dict[str, Any]:
        sup = dev.sup
        uptime = sup.uptime()
        stats = dev.stats
        return {
            "name": dev.name,
            "kind": dev.spec.kind,
            "state": sup.state.value,
            "pid": sup.pid,
            "uptime_s": round(uptime, 3) if uptime is not None else None,
            "restarts": sup.restarts,
            "last_exit": (
                {**sup.last_exit.as_dict(), "stderr": list(dev.exit_stderr)}
                if sup.last_exit
                else None
            ),
            "cpu_percent": dev.cpu_percent,
            "rss_bytes": dev.rss_bytes,
            "num_fds": dev.num_fds,
            "msgs_in": stats["in_msgs_received"],
            "msgs_out": stats["out_msgs_sent"],
            "bytes_in": stats["in_bytes_received"],
            "bytes_out": stats["out_bytes_sent"],
            "stats": dict(stats),
            "stats_at": round(dev.stats_at, 6) if dev.stats_at is not None else None,
            "endpoints": copy.deepcopy(dev.endpoints),
            "autostart": dev.spec.autostart,
            "message": dev.message,
        }

    def status_json(self, dev: Device) -> str:
        """Return status_of(dev) as compact JSON, rebuilt only when a field changed.

        A `status` of 100 devices is asked for far more often than their fields change
        (at most once per health tick), and encoding them is most of its cost.
        """
        sup = dev.sup
        key = (
            sup.state,
            sup.pid,
            sup.restarts,
            sup.last_exit,
            dev.exit_stderr,
            dev.cpu_percent,
            dev.rss_bytes,
            dev.num_fds,
            dev.stats,
            dev.stats_at,
            dev.message,
        )
        cached = dev.json_cache
        if cached is None or cached[0] != key:
            body = self.status_of(dev)
            del body["uptime_s"]
            cached = dev.json_cache = (key, json.dumps(body, separators=(",", ":"))[1:])
        uptime = sup.uptime()
        return f'{{"uptime_s":{round(uptime, 3) if uptime is not None else "null"},{cached[1]}'

    def close(self) -> None:
        self._to_spawn.clear()
        if self._health_timer is not None:
            self._health_timer.cancel()
        for dev in self.devices.values():
            for key in list(dev.timers):
                dev.cancel_timer(key)
            self._close_ctrl(dev)
            if dev.stderr is not None:
                self._close_stderr(dev, dev.stderr)
        if self._ctrl is not None:
            self.loop.remove_reader(self._ctrl)
            self._ctrl.close(linger=0)
            self._ctrl = None
        if self._ctrl_file is not None:
            self._ctrl_file.remove()
            self._ctrl_file = None


def _settled_after_start(dev: Device) -> bool:
    return dev.sup.state is not State.STARTING


def _no_process(dev: Device) -> bool:
    return dev.proc is None and dev.sup.state is not State.STARTING
