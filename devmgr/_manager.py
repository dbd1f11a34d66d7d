"""`devmgr.Manager`: supervise the devices of a config from one event-loop thread.

The public methods may be called from any thread; each hands its work to the loop
thread and waits for the answer, so the supervision state is only ever touched by one
thread. The operations themselves live in devmgr._operations: the control socket
(devmgr._control) calls them on the loop, the public methods here hand the same calls to
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
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import zmq

from devmgr._config import load_config
from devmgr._conncap import HANDSHAKE_IVL_MS, ConnectionCap
from devmgr._control import ControlServer
from devmgr._errors import ConfigError, ControlError, DevmgrError
from devmgr._fds import raise_nofile_limit
from devmgr._fleet import Fleet
from devmgr._loop import EventLoop
from devmgr._operations import LoopOperations
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
from devmgr._spec import (
    DeviceSpec,
    ManagerConfig,
    ManagerSettings,
)
from devmgr._tasks import Pending, settled, spawn
from devmgr._wire import CONTROL_SNDHWM

log = logging.getLogger("devmgr")
T = TypeVar("T")
# Seconds a burst of device events may hold back the systemd STATUS= summary.
_SUMMARY_DELAY = 0.05

#: Signals on which `run()` drains every device and returns (the manager exits 0).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Signals whose default action would end the manager with no drain: `run()` logs and
#: ignores them. (SIGQUIT, SIGTRAP, SIGSYS, SIGXCPU keep their core-dumping defaults.)
IGNORED_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR")
    if hasattr(signal, name)
)


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
        self._config: ManagerConfig = config
        self._ops: LoopOperations | None = None  # the operations, once started
        self._loop: EventLoop | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._fleet: Fleet | None = None
        self._events: zmq.Socket[bytes] | None = None
        self._control: ControlServer | None = None
        self._rundir: Path | None = None
        self._thread: threading.Thread | None = None
        self._shutdown_requested = threading.Event()
        self._stop_lock = threading.Lock()
        self._in_run = False
        self._signals_live = False  # run()'s handlers act only while the manager is up
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
    def config(self) -> ManagerConfig:
        """The config in use (`add`, `remove` and `reload` change its devices)."""
        return self._ops.config if self._ops is not None else self._config

    @config.setter
    def config(self, config: ManagerConfig) -> None:
        self._config = config
        if self._ops is not None:
            self._ops.config = config

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
        raise_nofile_limit()  # before the zygote and devices, which inherit it
        _log_warnings(settings)
        self._rundir = ensure_private_dir(ensure_private_dir(runtime_dir()) / f"m{os.getpid()}")
        self._ctx = zmq.Context()
        self._loop = EventLoop()
        try:
            # Events tell who runs what where: with CURVE they are as private as control.
            self._events = self._bind(zmq.PUB, settings.events, "manager.events", curve=True)
            ctrl_sock = self._bind(zmq.ROUTER, settings.control, "manager.control", curve=True)
            self._fleet = Fleet(
                self._loop,
                self._ctx,
                self._rundir,
                self._emit,
                health_interval=settings.health_interval,
                stop_timeout=settings.stop_timeout,
                ipc_bind_dirs=settings.ipc_bind_dirs,
            )
            self._ops = LoopOperations(
                self._fleet,
                self.config,
                self._emit,
                self._notify,
                off_loop=self._off_loop,
                on_shutdown=self._on_shutdown,
            )
            control = self._control = ControlServer(self._ops, ctrl_sock)
            self._ops.replies_dropped = lambda: control.replies_dropped
            if settings.metrics is not None:
                from devmgr._metrics import MetricsServer

                self._metrics = MetricsServer(settings.metrics, self._metrics_status)
                self._metrics.start()
        except BaseException:
            self._teardown()
            raise
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
            self._emit(
                "manager.started",
                pid=os.getpid(),
                config=str(self.config.path) if self.config.path else None,
                control=settings.control,
                events=settings.events,
            )
            assert self._ops is not None
            started = self._ops.start_ordered(autostart)
            settled(started).add_done_callback(lambda _done: resolve(None))

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
            status = self._now(lambda ops: ops.status_dict(), timeout=2.0)
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
                if self._ops is None or not self._ops.stopping_emitted:
                    self._emit_threadsafe("manager.stopping")
                try:
                    self._run(lambda ops: ops.stop_all(), timeout=timeout)
                except TimeoutError:
                    log.error("devices did not stop within %ss: killing them", timeout)
                    try:
                        self._run(lambda ops: ops.kill_all(), timeout=5.0)
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

        def done(reloaded: Pending[dict[str, Any]]) -> None:
            error = reloaded.error()
            if error is not None:
                log.error("SIGHUP: reload failed, the config in use stays: %s", error.message)
                return
            result = reloaded.result()
            summary = "; ".join(
                f"{key} {', '.join(names) if names else '-'}"
                for key, names in result.items()
                if key not in ("unchanged", "config")
            )
            log.info("SIGHUP: reloaded: %s; %d unchanged", summary, len(result["unchanged"]))

        assert self._ops is not None
        spawn(self._ops.reload()).add_done_callback(done)

    def _on_shutdown(self) -> None:
        """A `shutdown` stopped every device (on the loop): end the manager."""
        self._shutdown_requested.set()
        if not self._in_run:  # embedded: nobody waits in run(), so stop from a thread
            threading.Thread(target=self.stop, name="devmgr-shutdown", daemon=True).start()

    # ---- plumbing -----------------------------------------------------------------------

    def _call(self, fn: Callable[..., None], timeout: float | None = None) -> Any:
        if self._loop is None or self._thread is None:
            raise DevmgrError("the manager is not running (call start() first)")
        return self._loop.run_sync(fn, timeout)

    def _now(self, answer: Callable[[LoopOperations], T], timeout: float | None = None) -> T:
        """Return `answer(operations)`, computed on the loop thread."""
        ops = self._ops
        if ops is None or self._loop is None or self._thread is None:
            raise DevmgrError("the manager is not running (call start() first)")

        def compute(resolve: Callable[[T], None], _reject: Callable[[BaseException], None]) -> None:
            resolve(answer(ops))

        return self._loop.run_sync(compute, timeout)

    def _run(
        self,
        operation: Callable[[LoopOperations], Coroutine[Pending[Any], None, T]],
        timeout: float | None = None,
    ) -> T:
        """Run an operation on the loop and wait for it; raise ControlError on its error."""
        ops = self._ops
        if ops is None or self._loop is None or self._thread is None:
            raise DevmgrError("the manager is not running (call start() first)")

        def begin(resolve: Callable[[T], None], reject: Callable[[BaseException], None]) -> None:
            def finished(done: Pending[T]) -> None:
                error = done.error()
                if error is not None:
                    reject(error)
                else:
                    resolve(done.result())

            spawn(operation(ops)).add_done_callback(finished)

        return self._loop.run_sync(begin, timeout)

    def _off_loop(self, work: Callable[[], T]) -> Pending[T]:
        """Run `work()` on the parse thread; the outcome arrives on the loop.

        One parse thread, so requests sent off the loop come back in the order they came.
        A ConfigError is an `invalid_spec` refusal; any other exception a bug, answered
        `internal`, which costs one request, never the manager.
        """
        if self._parser is None:  # made at the first use, shut down at teardown
            self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devmgr-parse")
        loop, parser = self._loop, self._parser
        assert loop is not None
        outcome: Pending[T] = Pending()

        def run() -> None:
            try:
                result = work()
            except Exception as exc:  # handed to the loop
                error = exc
                loop_call(lambda: outcome.set_error(_refusal(error)))
            else:
                loop_call(lambda: outcome.set_result(result))

        def loop_call(callback: Callable[[], None]) -> None:
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:  # the manager stopped meanwhile: nobody to answer
                pass

        parser.submit(run)
        return outcome

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

    # ---- in-process API: the control commands' operations, from any thread --------------

    def status(self, names: list[str] | None = None) -> dict[str, Any]:
        """Return the same data as the control command `status`."""
        return self._now(lambda ops: ops.status_dict(names))

    def start_device(self, name: str) -> dict[str, Any]:
        return self._run(lambda ops: ops.start([name]))[0]

    def stop_device(self, name: str) -> dict[str, Any]:
        return self._run(lambda ops: ops.stop([name]))[0]

    def restart(self, name: str) -> dict[str, Any]:
        return self._run(lambda ops: ops.restart([name]))[0]

    def pause(self, name: str) -> dict[str, Any]:
        return self._run(lambda ops: ops.pause(name))

    def resume(self, name: str) -> dict[str, Any]:
        return self._run(lambda ops: ops.resume(name))

    def stats(self, name: str) -> dict[str, int]:
        return self._run(lambda ops: ops.stats(name))

    def logs(self, name: str, lines: int = 50, after: int | None = None) -> dict[str, Any]:
        """Return the same data as the control command `logs`: the device's stderr lines."""
        return self._now(lambda ops: ops.logs_dict(name, lines, after))

    def add(self, spec: DeviceSpec | dict[str, Any]) -> dict[str, Any]:
        return self._run(lambda ops: ops.add(spec))

    def remove(self, name: str) -> None:
        self._run(lambda ops: ops.remove(name))

    def reload(self, config: ManagerConfig | None = None) -> dict[str, Any]:
        """Apply `config` (default: re-read the config file) device by device.

        Returns the reload result: `config` (the file, None for a config given here) and
        the names `added`, `removed`, `changed` and `unchanged`.
        """
        return self._run(lambda ops: ops.reload(config))


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


def _refusal(exc: Exception) -> ControlError:
    """The error reply for what the parse thread raised."""
    if isinstance(exc, ControlError):
        return exc
    if isinstance(exc, ConfigError):
        return ControlError("invalid_spec", str(exc))
    log.error("internal error while validating", exc_info=exc)
    return ControlError("internal", f"{type(exc).__name__}: {exc}")


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
