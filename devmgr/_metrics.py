"""Prometheus metrics and health endpoints of a manager (`[manager] metrics = "HOST:PORT"`).

`MetricsServer` serves, from a thread of its own:

- `/metrics`: the Prometheus exposition (text or OpenMetrics, gzip when asked), built at
  each scrape by a custom collector that calls `collect()` once: nothing is polled in
  the background and no figure is older than the manager's own status.
- `/healthz`: 200 while the manager's event loop is alive, else 503 (a liveness probe).
- `/readyz`: 200 while the loop is alive and every autostart device is running (or
  paused, which is an operator's choice rather than a failure), else 503 with the
  devices that are not (a readiness probe).

`collect()` contract (the manager provides it):
    Called from an HTTP worker thread, possibly from several at once, once per request.
    Returns the `status` result of the control protocol (docs/protocol.md:
    `{"manager": {...}, "devices": [...]}`) plus `"alive": bool`, True when the manager's
    event loop has run recently. It should return within a second; when the loop does
    not answer it should return `{"alive": False}` (manager and devices may then be
    missing) rather than block. An exception counts as `{"alive": False}`.
    Optional per-device `"exits": {reason: count}` (cumulative exits by
    `last_exit.reason`) is exported as `devmgr_device_exits_total` when present.

Exit reasons: a counter per reason cannot be derived from successive status snapshots
without losing exits that happen between two scrapes, so the exposition states what the
status knows exactly: `devmgr_device_last_exit_info{reason,code,signal}` and
`devmgr_device_last_exit_timestamp_seconds` for the last exit, `devmgr_device_restarts_total`
for automatic restarts, and `devmgr_device_exits_total{reason}` only from the manager's
own cumulative counts (the optional `exits` field above).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from devmgr._errors import DevmgrError
from devmgr._version import __version__
from devmgr._wire import STAT_KEYS, Reason, State

log = logging.getLogger("devmgr.metrics")

STATES = tuple(state.value for state in State)
EXIT_REASONS = tuple(reason.value for reason in Reason)
# Up and ready: the process runs and its loop answers. `paused` is included because an
# operator paused it on purpose; taking the pod out of service for that would surprise.
UP_STATES = frozenset({State.RUNNING.value, State.PAUSED.value})
# (status key of a STATISTICS message counter) -> (socket, direction) labels; the byte
# counters have the same labels ("in_msgs_received" -> in, received).
_STAT_LABELS = {key: (key.split("_")[0], key.split("_")[2]) for key in STAT_KEYS if "_msgs_" in key}

Collect = Callable[[], Mapping[str, Any]]


def parse_address(address: str) -> tuple[str, int]:
    """Split 'HOST:PORT' (IPv6 hosts in brackets, e.g. '[::1]:9700') into host and port.

    Raises:
        ValueError: not HOST:PORT with a port from 0 to 65535.
    """
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT, e.g. 127.0.0.1:9700")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def safe_collect(collect: Collect) -> Mapping[str, Any]:
    """Call `collect()`; return `{"alive": False}` when it fails or returns no mapping."""
    try:
        status = collect()
    except Exception as exc:
        log.debug("metrics: collect() failed: %r", exc)
        return {"alive": False}
    if not isinstance(status, Mapping):
        log.debug("metrics: collect() returned %r, not a mapping", type(status).__name__)
        return {"alive": False}
    return status


def not_ready(status: Mapping[str, Any]) -> list[str]:
    """Return why the manager is not ready ([] when it is): one entry per cause."""
    if not status.get("alive"):
        return ["manager loop not alive"]
    return [
        f"{dev.get('name')} is {dev.get('state')}"
        for dev in status.get("devices") or ()
        if dev.get("autostart", True) and dev.get("state") not in UP_STATES
    ]


class StatusCollector:
    """A prometheus-client collector that turns one `collect()` per scrape into metrics."""

    def __init__(self, collect: Collect) -> None:
        self._collect = collect

    def describe(self) -> Iterable[Metric]:
        """Name every family (without samples) so the registry can check for clashes."""
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        """Build the metric families from the manager's status at this scrape."""
        status = safe_collect(self._collect)
        fam = self._families()
        alive = bool(status.get("alive"))
        manager = status.get("manager") or {}
        devices = [d for d in status.get("devices") or () if isinstance(d, Mapping)]
        fam.alive.add_metric([], 1.0 if alive else 0.0)
        fam.ready.add_metric([], 0.0 if not_ready(status) else 1.0)
        fam.build.add_metric([], {"version": str(manager.get("version") or __version__)})
        if manager.get("uptime_s") is not None:
            fam.uptime.add_metric([], float(manager["uptime_s"]))
        if alive and "devices" in status:
            by_state = dict.fromkeys(STATES, 0)
            for dev in devices:
                state = str(dev.get("state"))
                by_state[state] = by_state.get(state, 0) + 1
            for state, count in by_state.items():
                fam.devices.add_metric([state], float(count))
        for dev in devices:
            _device_samples(fam, dev)
        # A family without samples (no device has exited yet...) says nothing: leave it out.
        yield from (family for family in fam if family.samples)

    def _families(self) -> _Families:
        return _Families()


class _Families:
    """The metric families of one scrape, in exposition order."""

    def __init__(self) -> None:
        g, c = GaugeMetricFamily, CounterMetricFamily
        d = ["device"]
        self.alive = g("devmgr_manager_alive", "1 while the manager's event loop runs")
        self.ready = g(
            "devmgr_manager_ready", "1 while every autostart device is running (as /readyz)"
        )
        self.build = InfoMetricFamily("devmgr_build", "devmgr version", labels=())
        self.uptime = g("devmgr_manager_uptime_seconds", "seconds since the manager started")
        self.devices = g("devmgr_devices", "devices by state", labels=["state"])
        self.info = g(
            "devmgr_device_info",
            "1 per device, with its kind and autostart",
            labels=[*d, "kind", "autostart"],
        )
        self.state = g(
            "devmgr_device_state",
            "1 for the device's current state, 0 for the others",
            labels=[*d, "state"],
        )
        self.up = g("devmgr_device_up", "1 while the device's process runs and answers", labels=d)
        self.restarts = c(
            "devmgr_device_restarts", "automatic restarts (crash, memory, unresponsive)", labels=d
        )
        self.exits = c(
            "devmgr_device_exits",
            "exits of the device's process by reason",
            labels=[*d, "reason"],
        )
        self.last_exit = g(
            "devmgr_device_last_exit_info",
            "1, labelled with the last exit's reason, code, signal",
            labels=[*d, "reason", "code", "signal"],
        )
        self.last_exit_at = g(
            "devmgr_device_last_exit_timestamp_seconds", "unix time of the last exit", labels=d
        )
        self.messages = c(
            "devmgr_device_messages",
            "messages per socket and direction since the device's process started",
            labels=[*d, "socket", "direction"],
        )
        self.bytes = c(
            "devmgr_device_bytes",
            "message bytes per socket and direction since the device's process started",
            labels=[*d, "socket", "direction"],
        )
        self.cpu = g(
            "devmgr_device_cpu_usage_ratio",
            "CPU used by the device's process, in cores (1.0 = one core busy)",
            labels=d,
        )
        self.rss = g(
            "devmgr_device_resident_memory_bytes",
            "resident memory of the device's process",
            labels=d,
        )
        self.fds = g(
            "devmgr_device_open_fds", "open file descriptors of the device's process", labels=d
        )
        self.dev_uptime = g(
            "devmgr_device_uptime_seconds", "seconds since the device's process started", labels=d
        )

    def __iter__(self) -> Iterator[Metric]:
        return iter(vars(self).values())


def _num(value: Any) -> float | None:
    """Return a sample value, or None for a missing one (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _device_samples(fam: _Families, dev: Mapping[str, Any]) -> None:
    name = str(dev.get("name"))
    state = str(dev.get("state"))
    fam.info.add_metric(
        [name, str(dev.get("kind", "")), "true" if dev.get("autostart", True) else "false"], 1.0
    )
    for each in STATES if state in STATES else (*STATES, state):
        fam.state.add_metric([name, each], 1.0 if each == state else 0.0)
    fam.up.add_metric([name], 1.0 if state in UP_STATES else 0.0)
    restarts = _num(dev.get("restarts"))
    if restarts is not None:
        fam.restarts.add_metric([name], restarts)
    exits = dev.get("exits")
    if isinstance(exits, Mapping):
        for reason in dict.fromkeys([*EXIT_REASONS, *map(str, exits)]):
            fam.exits.add_metric([name, reason], _num(exits.get(reason)) or 0.0)
    last = dev.get("last_exit")
    if isinstance(last, Mapping):
        labels = [name, str(last.get("reason") or "")]
        labels += ["" if last.get(k) is None else str(last.get(k)) for k in ("code", "signal")]
        fam.last_exit.add_metric(labels, 1.0)
        at = _num(last.get("at"))
        if at is not None:
            fam.last_exit_at.add_metric([name], at)
    stats = dev.get("stats")
    if isinstance(stats, Mapping):
        for key, (sock, direction) in _STAT_LABELS.items():
            msgs = _num(stats.get(key))
            octets = _num(stats.get(key.replace("_msgs_", "_bytes_")))
            if msgs is not None:
                fam.messages.add_metric([name, sock, direction], msgs)
            if octets is not None:
                fam.bytes.add_metric([name, sock, direction], octets)
    cpu = _num(dev.get("cpu_percent"))
    if cpu is not None:
        fam.cpu.add_metric([name], cpu / 100.0)
    for family, key in ((fam.rss, "rss_bytes"), (fam.fds, "num_fds"), (fam.dev_uptime, "uptime_s")):
        value = _num(dev.get(key))
        if value is not None:
            family.add_metric([name], value)


# Bounds of the HTTP server (issue 11 part 4): at most this many connections are served
# at once, each by its own thread; one more is answered 503 at once and closed. A client
# gets `IDLE_TIMEOUT` per read or write and `REQUEST_DEADLINE` in all, so an idle, a
# half-sent (slowloris) or a never-reading connection holds a slot and an fd that long.
MAX_CONNECTIONS = 16
IDLE_TIMEOUT = 5.0
REQUEST_DEADLINE = 10.0
_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 5\r\nConnection: close\r\nRetry-After: 1\r\n\r\nbusy\n"
)


class _QuietHandler(WSGIRequestHandler):
    """Log requests at debug level instead of printing each one to stderr."""

    timeout = IDLE_TIMEOUT  # StreamRequestHandler applies it to the connection

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s - %s", self.address_string(), format % args)


class _Server(WSGIServer):
    """A thread per connection, at most `max_connections` at once, each with a deadline.

    A slow collect() cannot hold up a health probe (each request has its own thread), and
    no client can make the server hold more than `max_connections` threads and fds: the
    serving thread refuses one more with a 503, and closes (shutdown(2), which the
    handler thread sees as an error) any connection past its deadline.
    """

    daemon_threads = True
    request_queue_size = 64
    max_connections = MAX_CONNECTIONS
    request_deadline = REQUEST_DEADLINE

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        self.refused = 0  # connections answered 503 because every slot was taken
        self.timed_out = 0  # connections closed at their deadline

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            try:
                request.setblocking(False)
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._deadlines_lock:
            self._deadlines[request] = time.monotonic() + self.request_deadline
        try:
            threading.Thread(
                target=self._serve_one,
                args=(request, client_address),
                name="devmgr-metrics-request",
                daemon=True,
            ).start()
        except RuntimeError:  # no thread to be had: drop this one, keep serving
            self._done(request)
            self.shutdown_request(request)

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._done(request)
            self.shutdown_request(request)

    def _done(self, request: Any) -> None:
        with self._deadlines_lock:
            if self._deadlines.pop(request, None) is None:
                return
        self._slots.release()

    def service_actions(self) -> None:
        """Called by serve_forever at each poll_interval: close overdue connections."""
        now = time.monotonic()
        with self._deadlines_lock:
            overdue = [r for r, deadline in self._deadlines.items() if deadline <= now]
            for request in overdue:
                self._deadlines[request] = now + 3600.0  # once; the handler releases it
        for request in overdue:
            self.timed_out += 1
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper hanging up mid-response is not the manager's problem.
        log.debug("metrics: error serving %s", client_address, exc_info=True)


class MetricsServer:
    """Serve /metrics, /healthz and /readyz over HTTP from a background thread.

    Args:
        address: "HOST:PORT" to listen on (IPv6 in brackets; port 0 picks a free one).
        collect: returns the manager's status plus "alive" (see the module docstring).
    """

    def __init__(
        self,
        address: str,
        collect: Collect,
        *,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        request_deadline: float = REQUEST_DEADLINE,
    ) -> None:
        self.address = address
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.request_deadline = request_deadline
        self._host, self._port = parse_address(address)
        self._collect = collect
        self.registry = CollectorRegistry()
        self.registry.register(StatusCollector(collect))
        # The manager process's own CPU, memory, fds and start time (process_* metrics).
        ProcessCollector(registry=self.registry)
        self._metrics_app = make_wsgi_app(self.registry)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        """Return the (host, port) actually listened on (after start())."""
        if self._httpd is None:
            return self._host, self._port
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Listen and serve from a daemon thread; return once the socket is bound.

        Raises:
            DevmgrError: the address cannot be resolved or bound (e.g. in use).
        """
        if self._httpd is not None:
            return
        try:
            infos = socket.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, sockaddr = infos[0]

            class Server(_Server):
                address_family = family
                max_connections = self.max_connections
                request_deadline = self.request_deadline

            class Handler(_QuietHandler):
                timeout = self.idle_timeout

            httpd = make_server(
                str(sockaddr[0]), self._port, self._app, Server, handler_class=Handler
            )
        except OSError as exc:
            raise DevmgrError(
                f"cannot serve metrics on {self.address}: {exc.strerror or exc}"
            ) from exc
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="devmgr-metrics",
            daemon=True,
        )
        self._thread.start()
        log.info("metrics on http://%s/metrics", self.address)

    def stop(self) -> None:
        """Stop serving and close the socket (requests in progress finish on their own)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the WSGI application -----------------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        method = environ.get("REQUEST_METHOD", "GET")
        if path in ("/healthz", "/readyz", "/"):
            if method not in ("GET", "HEAD"):
                return _reply(start_response, "405 Method Not Allowed", "use GET\n", method)
            if path == "/":
                body = "devmgr: /metrics /healthz /readyz\n"
                return _reply(start_response, "200 OK", body, method)
            status = safe_collect(self._collect)
            if path == "/healthz":
                if status.get("alive"):
                    return _reply(start_response, "200 OK", "ok\n", method)
                return _reply(
                    start_response, "503 Service Unavailable", "manager loop not alive\n", method
                )
            problems = not_ready(status)
            if not problems:
                return _reply(start_response, "200 OK", "ready\n", method)
            body = "not ready: " + "; ".join(problems) + "\n"
            return _reply(start_response, "503 Service Unavailable", body, method)
        return _reply(start_response, "404 Not Found", "not found: try /metrics\n", method)


def _reply(start_response: Callable[..., Any], status: str, body: str, method: str) -> list[bytes]:
    data = body.encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [] if method == "HEAD" else [data]
