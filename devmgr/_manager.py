"""`devmgr.Manager`: supervise the devices of a config from one event-loop thread.

The public methods may be called from any thread; each hands its work to the loop
thread and waits for the answer, so the supervision state is only ever touched by one
thread. The control socket (devmgr._control) calls the same `op_*` methods from inside
the loop, so the in-process API and the control protocol cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from devmgr._config import load_config
from devmgr._conncap import HANDSHAKE_IVL_MS, ConnectionCap
from devmgr._errors import ConfigError, ControlError, DevmgrError
from devmgr._fds import raise_nofile_limit
from devmgr._fleet import Device, Fleet
from devmgr._loop import EventLoop
from devmgr._paths import (
    BoundFile,
    IpcPathTaken,
    ensure_private_dir,
    ipc_path,
    make_dirs,
    runtime_dir,
    safe_bind,
    unlink_if_ours,
)
from devmgr._protocol import RawJSON
from devmgr._spec import (
    DeviceSpec,
    ManagerConfig,
    ManagerSettings,
    config_conflicts,
    drain_budget_issues,
    format_loc,
    render_issue,
)
from devmgr._version import __version__
from devmgr._wire import CONTROL_SNDHWM, PROTOCOL_VERSION

log = logging.getLogger("devmgr")
# Seconds a burst of device events may hold back the systemd STATUS= summary.
_SUMMARY_DELAY = 0.05

Done = Callable[[Any, ControlError | None], None]

# Devices a reload creates per loop turn before it lets the loop serve other work.
_APPLY_SLICE = 100

#: Signals on which `run()` drains every device and returns (the manager exits 0).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Signals whose default action would end the manager with no drain: `run()` logs and
#: ignores them. (SIGQUIT, SIGTRAP, SIGSYS, SIGXCPU keep their core-dumping defaults.)
IGNORED_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR")
    if hasattr(signal, name)
)


def _gather(count: int, done: Done, result: Callable[[], Any]) -> Done:
    """Return a callback that calls `done(result())` after `count` calls (first error wins)."""
    remaining = count
    errors: list[ControlError] = []

    def one(_value: Any, error: ControlError | None) -> None:
        nonlocal remaining
        if error is not None:
            errors.append(error)
        remaining -= 1
        if remaining == 0:
            if errors:
                code = errors[0].code
                done(None, ControlError(code, "; ".join(e.message for e in errors)))
            else:
                done(result(), None)

    if count == 0:
        done(result(), None)
    return one


class Manager:
    """Supervise ZeroMQ devices: start, watch, restart with backoff, and take commands.

    Args:
        config: a ManagerConfig, or the path of a TOML config file; None runs the
            embedded default config.
    """

    def __init__(self, config: ManagerConfig | str | os.PathLike[str] | None = None) -> None:
        if config is None:
            from devmgr._config import default_config

            config = default_config()
        elif not isinstance(config, ManagerConfig):
            config = load_config(config)
        self.config: ManagerConfig = config
        self._loop: EventLoop | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._fleet: Fleet | None = None
        self._events: zmq.Socket[bytes] | None = None
        self._control: Any = None
        self._rundir: Path | None = None
        self._started_mono = 0.0
        self._thread: threading.Thread | None = None
        self._shutdown_requested = threading.Event()
        self._stop_lock = threading.Lock()
        self._in_run = False
        self._signals_live = False  # run()'s handlers act only while the manager is up
        self._stopping_emitted = False
        self._caps: list[ConnectionCap] = []  # connection bounds of control and events
        # ipc files this manager bound: removed at the end if still ours, bound again if gone
        self._bound_files: list[BoundFile] = []
        # Validation proportional to the input (an `add` spec, a reloaded config file)
        # runs here, so that it never stalls supervision on the loop thread.
        self._parser: ThreadPoolExecutor | None = None
        #: Called on the loop thread with (topic, event) for every lifecycle event; it
        #: must return quickly and must not call this Manager's methods.
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        from devmgr._notify import SdNotify

        # Only `run()` (the service itself) speaks to systemd: a Manager embedded in an
        # application running under Type=notify must not answer for that application.
        self._notify = SdNotify(environ={})
        self._metrics: Any = None
        self._heartbeat = 0.0
        self._summary = ""
        self._summary_due = False

    # ---- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Manager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind the control and events sockets and start every autostart device.

        Returns once each autostart device is running or has failed its first start.

        Raises:
            DevmgrError: the control or events endpoint cannot be bound (in use, or
                another manager answers there).
        """
        if self._thread is not None:
            raise RuntimeError("this Manager was already started")
        settings = self.config.manager
        self._shutdown_requested.clear()
        self._stopping_emitted = False
        raise_nofile_limit()  # before the zygote and devices, which inherit it
        _log_warnings(settings)
        self._rundir = ensure_private_dir(ensure_private_dir(runtime_dir()) / f"m{os.getpid()}")
        self._ctx = zmq.Context()
        self._loop = EventLoop()
        try:
            # Events tell who runs what where: with CURVE they are as private as control.
            self._events = self._bind(zmq.PUB, settings.events, "manager.events", curve=True)
            from devmgr._control import ControlServer

            ctrl_sock = self._bind(zmq.ROUTER, settings.control, "manager.control", curve=True)
            self._control = ControlServer(self, ctrl_sock)
            self._fleet = Fleet(
                self._loop,
                self._ctx,
                self._rundir,
                self._emit,
                health_interval=settings.health_interval,
                stop_timeout=settings.stop_timeout,
            )
            if settings.metrics is not None:
                from devmgr._metrics import MetricsServer

                self._metrics = MetricsServer(settings.metrics, self._metrics_status)
                self._metrics.start()
        except BaseException:
            self._teardown()
            raise
        self._started_mono = time.monotonic()
        self._thread = threading.Thread(target=self._loop.run, name="devmgr-loop", daemon=True)
        self._loop.thread = self._thread
        self._thread.start()
        self._loop.call_soon_threadsafe(self._beat)

        def setup(resolve: Callable[[Any], None], reject: Callable[[BaseException], None]) -> None:
            assert self._fleet is not None and self._control is not None
            assert self._loop is not None
            self._loop.add_reader(self._control.socket, self._control.on_readable)
            self._watch_connections()
            self._fleet.prepare()
            for spec in self.config.devices.values():
                self._fleet.add_device(spec)
            autostart = [d for d in self._fleet.devices.values() if d.spec.autostart]
            finish = _gather(len(autostart), lambda _r, _e: resolve(None), lambda: None)
            self._emit(
                "manager.started",
                pid=os.getpid(),
                config=str(self.config.path) if self.config.path else None,
                control=settings.control,
                events=settings.events,
            )
            for dev in autostart:
                self._fleet.start(dev, finish)

        try:
            self._call(setup)
        except Exception as exc:  # nothing half up: stop what did start, then say why
            self.stop()
            raise DevmgrError(f"the manager could not start: {exc}") from exc

        def first_status(resolve: Callable[[None], None], _reject: Any) -> None:
            self._update_status()
            resolve(None)

        self._call(first_status)  # the first STATUS= goes out before READY=1
        self._notify.ready()

    def _watch_connections(self) -> None:
        """Bound the connections of the control and events sockets (on the loop thread).

        Also the moment from which run()'s signal handlers hand work to the loop: what
        they queue runs after this set-up, once the devices exist.
        """
        assert self._loop is not None and self._control is not None
        socks = [self._control.socket, *([self._events] if self._events is not None else [])]
        self._caps = [ConnectionCap(self._loop, sock) for sock in socks]
        self._signals_live = self._in_run

    def _beat(self) -> None:
        assert self._loop is not None
        self._heartbeat = time.monotonic()
        # An `rm -rf` of the runtime folder takes the sockets with it: bind them again,
        # or no client (and no restarted device) could reach the manager any more.
        for bound in self._bound_files:
            bound.keep(log)
        if self._fleet is not None:
            self._fleet.keep_ctrl_file()
        interval = self._notify.watchdog_interval()
        if interval is not None:
            self._notify.watchdog()
        self._loop.call_later(min(interval or 1.0, 1.0), self._beat)

    def _update_status(self) -> None:
        self._summary_due = False
        if self._fleet is None:
            return
        counts: dict[str, int] = {}
        for dev in self._fleet.devices.values():
            counts[dev.sup.state.value] = counts.get(dev.sup.state.value, 0) + 1
        summary = ", ".join(
            [f"{counts.get(s, 0)} {s}" for s in ("running", "backoff", "fatal")]
            + [f"{n} {s}" for s, n in counts.items() if s not in ("running", "backoff", "fatal")]
        )
        if summary != self._summary:
            self._summary = summary
            self._notify.status(summary)

    def _metrics_status(self) -> dict[str, Any]:
        alive = time.monotonic() - self._heartbeat < 5.0
        try:
            status: dict[str, Any] = self._call(
                lambda resolve, reject: resolve(self.status_dict()), timeout=2.0
            )
        except Exception:
            return {"alive": False}
        status["alive"] = alive
        return status

    def _bind(self, kind: int, endpoint: str, place: str, curve: bool = False) -> zmq.Socket[bytes]:
        assert self._ctx is not None
        sock = self._ctx.socket(kind)
        bound = None
        try:
            sock.setsockopt(zmq.LINGER, 1000)
            # a connection that never completes its greeting (or CURVE handshake) is
            # closed after this; ConnectionCap bounds how many there are meanwhile
            sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
            path = ipc_path(endpoint)
            if path is not None and not str(path).startswith(("@", "*")):
                if not path.is_absolute():
                    raise DevmgrError(f"{place}: {endpoint}: ipc paths must be absolute")
                try:
                    if path.parent == runtime_dir():
                        ensure_private_dir(path.parent)
                    else:
                        make_dirs(path.parent)
                except OSError as exc:
                    raise DevmgrError(f"{place}: {endpoint}: {exc}") from exc
            if curve and self.config.manager.curve is not None:
                from devmgr._security import enable_curve_server

                enable_curve_server(self._ctx, sock, self.config.manager.curve)
            if kind == zmq.ROUTER:
                # Oversized requests are answered `too_large`; far larger ones are cut off
                # by libzmq before they can cost the manager memory.
                sock.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
                # A client that never reads gets at most CONTROL_SNDHWM replies queued;
                # MANDATORY makes a full queue EAGAIN (counted) instead of a silent drop.
                sock.setsockopt(zmq.SNDHWM, CONTROL_SNDHWM)
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            try:
                bound = safe_bind(sock, endpoint, mode=0o600)
            except IpcPathTaken as exc:
                raise DevmgrError(
                    f"{place}: cannot bind {endpoint}: {exc.strerror} (stop what runs "
                    "there, or give this manager another endpoint)"
                ) from exc
            except (zmq.ZMQError, OSError) as exc:
                raise DevmgrError(f"{place}: cannot bind {endpoint}: {exc.strerror}") from exc
        except BaseException:
            sock.close(linger=0)  # an open socket would make ctx.term() wait for ever
            if bound is not None:
                unlink_if_ours(*bound)
            raise
        if bound is not None:
            self._bound_files.append(BoundFile(sock, endpoint, bound))
        return sock

    def stop(self, timeout: float | None = None) -> None:
        """Stop every device in parallel (drain, then escalate), then the manager itself."""
        with self._stop_lock:
            if self._thread is None or self._loop is None:
                return
            if self._thread.is_alive():
                self._notify.stopping()
                if not self._stopping_emitted:
                    self._emit_threadsafe("manager.stopping")
                try:
                    self._call(self._op_stop_all, timeout=timeout)
                except TimeoutError:
                    log.error("devices did not stop within %ss: killing them", timeout)
                    try:
                        self._call(self._op_kill_all, timeout=5.0)
                    except TimeoutError:
                        log.error("devices did not die after SIGKILL within 5 s")
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
            if self._metrics is not None:
                self._metrics.stop()
                self._metrics = None
            self._teardown()
            self._thread = None
            self._shutdown_requested.set()

    def _teardown(self) -> None:
        if self._parser is not None:
            self._parser.shutdown(wait=False, cancel_futures=True)
            self._parser = None
        for cap in self._caps:
            cap.close()
        self._caps = []
        if self._fleet is not None:
            self._fleet.close()
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._events is not None:
            self._events.close(linger=100)
            self._events = None
        if self._ctx is not None:
            # Every socket we own is closed above; destroy() only cuts what a failed
            # start-up may have left open, which would otherwise make term() wait.
            self._ctx.destroy(linger=0)
            self._ctx = None
        if self._loop is not None:
            self._loop.close()
        # Only the files this manager bound: a manager that failed to start because
        # another one runs there must not delete that one's sockets.
        for bound in self._bound_files:
            bound.remove()
        self._bound_files.clear()
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)

    def run(self) -> None:
        """Run in the foreground until SIGTERM, SIGINT or a `shutdown` command.

        From the main thread it also handles the signals listed in README "Signals":
        SIGTERM and SIGINT drain and stop (repeats are ignored), SIGHUP re-reads the
        config file as `reload` does, and stray SIGUSR1, SIGUSR2 and the like are logged
        and ignored instead of killing the manager. The previous handlers come back on
        return. The zygote started for the devices is stopped (and waited for) before it
        returns, so nothing it started outlives it.
        """
        self._in_run = True
        from devmgr._notify import SdNotify
        from devmgr._zygote import ZYGOTE

        self._notify = SdNotify()  # the service: tell systemd (when it asked)
        in_main = threading.current_thread() is threading.main_thread()
        previous: dict[int, Any] = {}
        zygote_before = ZYGOTE.pid
        if in_main:
            previous = self._install_signal_handlers()
        try:
            self.start()
            while not self._shutdown_requested.wait(0.5):
                if not self.running:
                    break
        finally:
            self._signals_live = False
            self.stop()
            if zygote_before is None:  # ours: stopped and reaped before we return
                ZYGOTE.shutdown()
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Install run()'s handlers (main thread only); return the previous ones."""
        previous: dict[int, Any] = {}
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, self._on_stop_signal)
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_reload_signal)
        for sig in IGNORED_SIGNALS:
            previous[sig] = signal.signal(sig, self._on_ignored_signal)
        return previous

    # Signal handlers run in the main thread between two bytecodes, maybe inside a
    # logging call or a lock: they only set a flag or hand work to the loop thread.

    def _from_signal(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or not self._signals_live:
            return  # not set up yet, or stopping: nothing to hand the work to
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        if self._shutdown_requested.is_set():
            return  # a repeat during the drain changes nothing: exit 0 still
        self._shutdown_requested.set()
        name = signal.Signals(signum).name
        self._from_signal(lambda: log.info("%s: stopping every device, then the manager", name))

    def _on_reload_signal(self, _signum: int, _frame: Any) -> None:
        if self._shutdown_requested.is_set():
            return
        self._from_signal(self._reload_on_signal)

    def _on_ignored_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        self._from_signal(
            lambda: log.warning(
                "%s ignored (devmgr acts on SIGTERM, SIGINT and SIGHUP; see README Signals)",
                name,
            )
        )

    def _reload_on_signal(self) -> None:
        """SIGHUP, on the loop: what `devmgr reload` does, with the outcome logged."""
        source = str(self.config.path) if self.config.path else "embedded default"
        log.info("SIGHUP: reloading the config (%s)", source)

        def done(result: Any, error: ControlError | None) -> None:
            if error is not None:
                log.error("SIGHUP: reload failed, the config in use stays: %s", error.message)
                return
            summary = "; ".join(
                f"{key} {', '.join(names) if names else '-'}"
                for key, names in result.items()
                if key not in ("unchanged", "config")
            )
            log.info("SIGHUP: reloaded: %s; %d unchanged", summary, len(result["unchanged"]))

        try:
            self.op_reload(None, done)
        except ControlError as exc:
            done(None, exc)

    # ---- plumbing -----------------------------------------------------------------------

    def _call(self, fn: Callable[..., None], timeout: float | None = None) -> Any:
        if self._loop is None or self._thread is None:
            raise DevmgrError("the manager is not running (call start() first)")
        return self._loop.run_sync(fn, timeout)

    def _call_op(self, op: Callable[..., None], *args: Any) -> Any:
        """Run a loop-side op from another thread; raise ControlError on an error reply."""

        def fn(resolve: Callable[[Any], None], reject: Callable[[BaseException], None]) -> None:
            def done(result: Any, error: ControlError | None) -> None:
                if error is not None:
                    reject(error)
                else:
                    resolve(result)

            try:
                op(*args, done)
            except ControlError as exc:
                reject(exc)

        return self._call(fn)

    def _off_loop(
        self, work: Callable[[], Any], then: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run `work()` on the parse thread; call `then(result, error)` on the loop.

        One parse thread, so requests sent off the loop come back in the order they came.
        """
        if self._parser is None:  # made at the first use, shut down at teardown
            self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devmgr-parse")
        loop, parser = self._loop, self._parser
        assert loop is not None

        def run() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = work()
            except Exception as exc:  # handed to `then`, on the loop
                error = exc
            try:
                loop.call_soon_threadsafe(lambda: then(result, error))
            except RuntimeError:  # the manager stopped meanwhile: nobody to answer
                pass

        parser.submit(run)

    def _emit(self, topic: str, **fields: Any) -> None:
        event = {"event": topic, "at": round(time.time(), 6), **fields}
        _log_event(event)
        if self._events is not None:
            try:
                self._events.send_multipart(
                    [topic.encode(), json.dumps(event).encode()], zmq.NOBLOCK
                )
            except zmq.ZMQError:
                pass
        if self.on_event is not None:
            try:
                self.on_event(topic, event)
            except Exception:  # a user's callback must not break supervision
                log.exception("the on_event callback raised on %s", topic)
        if topic.startswith("device.") and not self._summary_due:
            # counting every device per event made a start or a restart storm of n
            # devices cost O(n^2): count once for each burst of events instead
            self._summary_due = True
            assert self._loop is not None
            self._loop.call_later(_SUMMARY_DELAY, self._update_status)

    def _emit_threadsafe(self, topic: str, **fields: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self._emit(topic, **fields))

    def _devices(self, names: list[str] | None) -> list[Device]:
        assert self._fleet is not None
        devices = self._fleet.devices
        if names is None or "*" in names:
            return [d for d in devices.values() if not d.removed]
        # by name: O(names), not O(devices) (`status NAME` of one device among 1,000)
        found = [devices.get(n) for n in dict.fromkeys(names)]
        unknown = [
            n for n, d in zip(dict.fromkeys(names), found, strict=True) if d is None or d.removed
        ]
        if unknown:
            listed = ", ".join(repr(n if len(n) <= 64 else n[:61] + "...") for n in unknown[:20])
            more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
            raise ControlError("unknown_device", f"no device named {listed}{more}")
        return [d for d in found if d is not None]

    # ---- loop-side operations (also used by the control server) ------------------------

    def _manager_info(self) -> dict[str, Any]:
        settings = self.config.manager
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "version": __version__,
            "config": str(self.config.path) if self.config.path else None,
            "control": settings.control,
            "events": settings.events,
            "replies_dropped": self._control.replies_dropped if self._control else 0,
        }

    def status_dict(self, names: list[str] | None = None) -> dict[str, Any]:
        assert self._fleet is not None
        devices = self._devices(names)
        fleet = self._fleet
        return {"manager": self._manager_info(), "devices": [fleet.status_of(d) for d in devices]}

    def status_json(self, names: list[str] | None = None) -> RawJSON:
        """Return the `status` result already encoded (the control socket's fast path)."""
        assert self._fleet is not None
        devices = self._devices(names)
        manager = self._manager_info()
        parts = ",".join(self._fleet.status_json(d) for d in devices)
        head = json.dumps(manager, allow_nan=False)
        return RawJSON(f'{{"manager":{head},"devices":[{parts}]}}')

    def logs_dict(self, name: str, lines: int = 50, after: int | None = None) -> dict[str, Any]:
        """The `logs` result: a device's stderr lines from its buffer (docs/protocol.md)."""
        (dev,) = self._devices([name])
        return dev.log.tail(lines, after)

    def version_dict(self) -> dict[str, Any]:
        return {"version": __version__, "protocol": PROTOCOL_VERSION}

    def op_names(self, verb: str, names: list[str], done: Done) -> None:
        """start, stop or restart the named devices ("*" = all) in parallel."""
        assert self._fleet is not None
        devices = self._devices(names)
        fleet = self._fleet
        action = {"start": fleet.start, "stop": fleet.stop, "restart": fleet.restart}[verb]
        finish = _gather(len(devices), done, lambda: [fleet.status_of(d) for d in devices])
        for dev in devices:
            action(dev, finish)

    def op_device_command(self, command: str, name: str, done: Done) -> None:
        """pause, resume or stats of one device."""
        assert self._fleet is not None
        dev = self._devices([name])[0]
        if command == "stats":
            if dev.proc is None or dev.awaiting_ready:
                done(dict(dev.stats), None)
                return
            self._fleet.control(dev, b"STATISTICS", done)
            return
        wire = {"pause": b"PAUSE", "resume": b"RESUME"}[command]
        fleet = self._fleet
        self._fleet.control(
            dev, wire, lambda _r, err: done(None if err else fleet.status_of(dev), err)
        )

    def op_add(self, data: dict[str, Any] | DeviceSpec, done: Done) -> None:
        """Validate, start and keep a new device; nothing is kept if its first start fails."""
        name = data.name if isinstance(data, DeviceSpec) else data.get("name")
        try:
            self._add(data, done)
        except ControlError as exc:
            log.info("add %s refused: %s: %s", name, exc.code, exc.message)
            raise

    def _add(self, data: dict[str, Any] | DeviceSpec, done: Done) -> None:
        from devmgr._config import parse_device

        if isinstance(data, DeviceSpec):
            self._add_spec(data, done)
            return

        def refused(error: ControlError) -> None:
            log.info("add %s refused: %s: %s", data.get("name"), error.code, error.message)
            done(None, error)

        # validation is proportional to the spec: on the parse thread, not the loop
        self._off_loop(lambda: parse_device(data), _answering(done, self._add_spec, refused))

    def _add_spec(self, spec: DeviceSpec, done: Done) -> None:
        assert self._fleet is not None
        fleet = self._fleet
        if spec.name in fleet.devices:
            raise ControlError("conflict", f"a device named {spec.name!r} exists already")
        refusal = fleet.fds.check()
        if refusal is not None:
            raise ControlError("conflict", refusal)
        # cross-device checks: linear in the binds, no re-validation of the other devices
        for code, issues in (
            ("conflict", config_conflicts(self.config.manager, {**fleet.specs(), spec.name: spec})),
            ("invalid_spec", drain_budget_issues(self.config.manager, {spec.name: spec})),
        ):
            if issues:
                lines = (f"{format_loc(loc)}: {msg}" for loc, msg in map(render_issue, issues))
                raise ControlError(code, "\n".join(lines))
        dev = fleet.add_device(spec)

        def started(_r: Any, error: ControlError | None) -> None:
            if error is None:
                # merged into the config as it is now: a reload may have run meanwhile
                devices = {**self.config.devices, spec.name: spec}
                self.config = self.config.model_copy(update={"devices": devices})
                self._emit(
                    "device.added", device=spec.name, kind=spec.kind, pid=dev.sup.pid, by="add"
                )
                done(fleet.status_of(dev), None)
                return
            log.info("add %s refused: %s: %s", spec.name, error.code, error.message)
            fleet.remove(dev, lambda _r2, _e2: done(None, error))

        fleet.start(dev, started)

    def op_remove(self, name: str, done: Done) -> None:
        assert self._fleet is not None
        dev = self._devices([name])[0]

        def removed(_r: Any, error: ControlError | None) -> None:
            devices = {n: s for n, s in self.config.devices.items() if n != name}
            self.config = self.config.model_copy(update={"devices": devices})
            if error is None:
                self._emit("device.removed", device=name, by="remove")
            done(None, error)

        self._fleet.remove(dev, removed)

    def op_reload(
        self, config: ManagerConfig | None, done: Done, *, expect_path: str | None = None
    ) -> None:
        """Apply a new config device by device: only what changed is touched.

        `config` None re-reads the manager's own file; `expect_path` (a client's `-c`)
        refuses that when the manager runs another file, rather than silently re-reading
        its own.
        """
        self._notify.reloading()

        def finished(diff: dict[str, Any], error: ControlError | None) -> None:
            # the diff is applied even when a device's start failed: say so either way
            self._notify.ready()
            self._emit(
                "manager.reloaded",
                config=diff["config"],
                added=diff["added"],
                removed=diff["removed"],
                changed=diff["changed"],
                error=None if error is None else error.message,
            )
            done(None if error else diff, error)

        def refused(exc: ControlError) -> None:
            self._notify.ready()
            log.info("reload refused: %s: %s", exc.code, exc.message)
            done(None, exc)

        try:
            self._reload(config, finished, expect_path, refused)
        except ControlError as exc:
            self._notify.ready()
            log.info("reload refused: %s: %s", exc.code, exc.message)
            raise

    def _reload(
        self,
        config: ManagerConfig | None,
        done: Done,
        expect_path: str | None,
        refused: Callable[[ControlError], None],
    ) -> None:
        """Diff and apply; `done(diff, error)` gets the diff also when a start failed."""
        if config is None:
            if expect_path is not None and not _same_file(self.config.path, expect_path):
                runs = (
                    f"runs {self.config.path}"
                    if self.config.path is not None
                    else "runs the embedded default config"
                )
                raise ControlError(
                    "conflict",
                    f"this manager {runs}, not {expect_path}; it re-reads only its own file "
                    f"(reload without -c, or start a manager with -c {expect_path} and a "
                    "control endpoint of its own)",
                )
            path = self.config.path
            if path is None:
                raise ControlError(
                    "invalid_spec", "the manager runs the embedded default config: no file"
                )
            # reading and validating the file costs ~1 ms per device: not on the loop
            self._off_loop(lambda: load_config(path), _answering(done, self._apply, refused))
            return
        self._apply(config, done)

    def _apply(self, config: ManagerConfig, done: Done) -> None:
        assert self._fleet is not None
        fleet = self._fleet
        # What runs is the truth to diff against (an `add` may not be in self.config yet).
        old, new = fleet.specs(), config.devices
        added = [n for n in new if n not in old]
        removed = [n for n in old if n not in new]
        changed = [n for n in new if n in old and new[n] != old[n]]
        unchanged = [n for n in new if n in old and new[n] == old[n]]
        if config.manager != self.config.manager:
            log.warning("reload: [manager] settings changed; they apply at the next start")
        result = {
            "config": str(config.path) if config.path is not None else None,
            "added": added,
            "removed": removed,
            "changed": changed,
            "unchanged": unchanged,
        }
        self.config = config.model_copy(update={"manager": self.config.manager})

        to_add = changed + added
        to_start: list[Device] = []
        is_new = set(added)

        def add_slice(begin: int) -> None:
            # a slice per loop turn: 2,000 new devices in one turn held the loop ~0.4 s
            end = begin + _APPLY_SLICE
            for name in to_add[begin:end]:
                if name in fleet.devices:  # an `add` or another reload took it meanwhile
                    log.warning("reload: %s was added meanwhile; that one is kept", name)
                    continue
                dev = fleet.add_device(new[name])
                if name in is_new:
                    self._emit("device.added", device=name, kind=new[name].kind, by="reload")
                if new[name].autostart:
                    to_start.append(dev)
            if end < len(to_add):
                assert self._loop is not None
                self._loop.call_later(0, lambda: add_slice(end))
                return
            finish = _gather(len(to_start), lambda _r, err: done(result, err), lambda: result)
            for dev in to_start:
                fleet.start(dev, finish)

        def start_phase(_r: Any, _e: ControlError | None) -> None:
            add_slice(0)

        def stopped(name: str) -> Done:
            def one(_r: Any, error: ControlError | None) -> None:
                if name in removed:
                    self._emit("device.removed", device=name, by="reload")
                stop_all(None, error)

            return one

        # Stop what goes or changes first: a changed device may rebind the same endpoint.
        to_stop = [fleet.devices[n] for n in removed + changed if n in fleet.devices]
        stop_all = _gather(len(to_stop), start_phase, lambda: None)
        for dev in to_stop:
            fleet.remove(dev, stopped(dev.name))

    def _stop_all(self, then: Done) -> None:
        """Stop every device in parallel; call `then` once none runs."""
        assert self._fleet is not None
        devices = list(self._fleet.devices.values())
        finish = _gather(len(devices), then, lambda: None)
        for dev in devices:
            self._fleet.stop(dev, finish)

    def _op_stop_all(
        self, resolve: Callable[[Any], None], reject: Callable[[BaseException], None]
    ) -> None:
        self._stop_all(lambda _r, _e: resolve(None))

    def _op_kill_all(
        self, resolve: Callable[[Any], None], reject: Callable[[BaseException], None]
    ) -> None:
        assert self._fleet is not None
        self._fleet.kill_all(lambda _r, _e: resolve(None))

    def op_shutdown(self, done: Done) -> None:
        self._emit("manager.stopping")
        self._stopping_emitted = True

        def stopped(_r: Any, _e: ControlError | None) -> None:
            done(None, None)
            self._shutdown_requested.set()
            if not self._in_run:  # embedded: nobody waits in run(), so stop from a thread
                threading.Thread(target=self.stop, name="devmgr-shutdown", daemon=True).start()

        self._stop_all(stopped)

    # ---- in-process API -----------------------------------------------------------------

    def status(self, names: list[str] | None = None) -> dict[str, Any]:
        """Return the same data as the control command `status`."""
        return self._call_op(lambda done: done(self.status_dict(names), None))  # type: ignore[no-any-return]

    def start_device(self, name: str) -> dict[str, Any]:
        return self._call_op(self.op_names, "start", [name])[0]  # type: ignore[no-any-return]

    def stop_device(self, name: str) -> dict[str, Any]:
        return self._call_op(self.op_names, "stop", [name])[0]  # type: ignore[no-any-return]

    def restart(self, name: str) -> dict[str, Any]:
        return self._call_op(self.op_names, "restart", [name])[0]  # type: ignore[no-any-return]

    def pause(self, name: str) -> dict[str, Any]:
        return self._call_op(self.op_device_command, "pause", name)  # type: ignore[no-any-return]

    def resume(self, name: str) -> dict[str, Any]:
        return self._call_op(self.op_device_command, "resume", name)  # type: ignore[no-any-return]

    def stats(self, name: str) -> dict[str, int]:
        return self._call_op(self.op_device_command, "stats", name)  # type: ignore[no-any-return]

    def logs(self, name: str, lines: int = 50, after: int | None = None) -> dict[str, Any]:
        """Return the same data as the control command `logs`: the device's stderr lines."""
        return self._call_op(lambda done: done(self.logs_dict(name, lines, after), None))  # type: ignore[no-any-return]

    def add(self, spec: DeviceSpec | dict[str, Any]) -> dict[str, Any]:
        return self._call_op(self.op_add, spec)  # type: ignore[no-any-return]

    def remove(self, name: str) -> None:
        self._call_op(self.op_remove, name)

    def reload(self, config: ManagerConfig | None = None) -> dict[str, Any]:
        """Apply `config` (default: re-read the config file) device by device.

        Returns the reload result: `config` (the file, None for a config given here) and
        the names `added`, `removed`, `changed` and `unchanged`.
        """
        return self._call_op(self.op_reload, config)  # type: ignore[no-any-return]


def _same_file(ours: Path | None, theirs: str) -> bool:
    """Return True when a client's config path names the file this manager runs."""
    if ours is None:
        return False
    try:
        return os.path.samefile(ours, theirs)
    except OSError:  # either one is gone or unreadable: compare the names
        return os.path.realpath(ours) == os.path.realpath(theirs)


# Event fields shown in the log line, in this order; lists are joined with commas.
_LOGGED_FIELDS = (
    "pid",
    "code",
    "signal",
    "reason",
    "delay",
    "kind",
    "by",
    "config",
    "control",
    "events",
    "added",
    "removed",
    "changed",
    "error",
)


def _log_warnings(settings: ManagerSettings) -> None:
    """Log what `devmgr validate` warns about, at every start (insecure_tcp_control)."""
    for place, message in settings.warnings():
        log.warning("%s: %s", place, message)


def _answering(
    done: Done,
    then: Callable[[Any, Done], None],
    refused: Callable[[ControlError], None] | None = None,
) -> Callable[[Any, BaseException | None], None]:
    """Return the loop-side callback of `_off_loop`: `then(result, done)`, or the refusal."""

    def resume(result: Any, error: BaseException | None) -> None:
        try:
            if error is not None:
                raise error
            then(result, done)
        except ConfigError as exc:
            refusal = ControlError("invalid_spec", str(exc))
        except ControlError as exc:
            refusal = exc
        except Exception as exc:  # a bug must cost one request, never the manager
            log.exception("internal error after validation")
            refusal = ControlError("internal", f"{type(exc).__name__}: {exc}")
        else:
            return
        (refused or (lambda e: done(None, e)))(refusal)

    return resume


def _log_event(event: dict[str, Any]) -> None:
    topic = event["event"]
    device = event.get("device")
    parts = []
    for key in _LOGGED_FIELDS:
        value = event.get(key)
        if value is None:
            if key == "config" and topic == "manager.started":
                parts.append("config=(embedded default)")
            continue
        text = str(value)
        if isinstance(value, list):
            text = ",".join(map(str, value)) or "-"
        elif key == "signal":
            try:
                text = f"{value} ({signal.Signals(value).name})"
            except ValueError:
                pass
        elif key == "delay":
            text = f"{value}s"
        parts.append(f"{key}={text}")
    level = logging.INFO
    if (
        topic == "device.unhealthy"
        or (topic == "device.exited" and event.get("reason") != "stopped")
        or (topic == "manager.reloaded" and event.get("error"))
    ):
        level = logging.WARNING
    elif topic == "device.fatal":
        level = logging.ERROR
    text = " ".join([topic, *([device] if device else []), *parts])
    log.log(level, "%s", text, extra={"event": event})
