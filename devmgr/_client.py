"""`devmgr.Client`: send control requests to a running manager (docs/protocol.md).

The client path is kept cheap to start: no pydantic, pyzmq imported when the first
request is sent, and the endpoint found by reading `[manager] control` with tomllib
rather than by validating the whole config.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from devmgr._errors import ConfigError, ControlError, DevmgrError, ManagerUnreachable
from devmgr._wire import PROTOCOL_VERSION

if TYPE_CHECKING:
    from pathlib import Path

    from devmgr._events import EventStream


CurvePair = tuple["str | os.PathLike[str]", "str | os.PathLike[str]"]


# ---- endpoint resolution (docs/cli.md) -----------------------------------------------


def control_endpoint_of(config_path: str | os.PathLike[str]) -> str:
    """Return the control endpoint a config file sets (or the default one).

    Reads only `[manager] control`: validating the whole config would cost the client
    pydantic. A relative ipc path resolves against the config file's folder.

    Raises:
        ConfigError: the file cannot be read or is not TOML.
    """
    return _control_of(config_path)[0]


def _control_of(config_path: str | os.PathLike[str]) -> tuple[str, bool]:
    """Return (control endpoint, whether the file sets it) of a config file."""
    from pathlib import Path  # only when a config file is involved: ~5 ms of start-up

    from devmgr._files import read_regular_file

    path = Path(config_path)
    try:
        raw = read_regular_file(path)  # never a FIFO or /dev/zero: that would hang
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    control = _parse_manager_control(path, raw)
    if control is None:
        from devmgr._paths import default_control_endpoint

        return default_control_endpoint(), False
    if not isinstance(control, str):
        raise ConfigError(f"{path}: manager.control must be a string")
    relative = control[len("ipc://") :]
    if control.startswith("ipc://") and relative and not relative.startswith(("/", "@", "*")):
        control = f"ipc://{(path.parent / relative).absolute()}"
    return control, True


def _parse_manager_control(path: Path, raw: bytes) -> object:
    # tomllib costs `devmgr status -c FILE` ~4 ms of CPU (its import and the parse; a
    # hand-written scan that was here saved that, 4-13 % of the command): not worth a
    # second TOML reader. tests/bench/bench_config_scan.py measured the two.
    import tomllib

    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    manager = data.get("manager")
    return manager.get("control") if isinstance(manager, dict) else None


def resolve_endpoint(endpoint: str | None = None, config: str | None = None) -> str:
    """Return the control endpoint to use (docs/cli.md, "Finding the manager").

    In order: `endpoint`; the control endpoint of the `config` file; $DEVMGR_ENDPOINT;
    that of $DEVMGR_CONFIG or ./devmgr.toml; the default ipc endpoint in the runtime dir.
    """
    return resolve_endpoint_source(endpoint, config)[0]


def resolve_endpoint_source(
    endpoint: str | None = None, config: str | None = None
) -> tuple[str, str]:
    """Return (control endpoint, how it was found), as resolve_endpoint finds it.

    The second item says in words where the endpoint came from, for error messages:
    "given with -e", "[manager] control of -c FILE", "$DEVMGR_ENDPOINT", ...
    """
    if endpoint:
        return connectable(endpoint), "given with -e"

    def of_file(path: str, named: str) -> tuple[str, str]:
        control, set_there = _control_of(path)
        if set_there:
            return connectable(control), f"[manager] control of {named}"
        return connectable(control), f"the default, as {named} sets no [manager] control"

    if config:
        return of_file(config, f"-c {config}")
    env = os.environ.get("DEVMGR_ENDPOINT")
    if env:
        return connectable(env), "$DEVMGR_ENDPOINT"
    env_config = os.environ.get("DEVMGR_CONFIG")
    if env_config:
        return of_file(env_config, f"$DEVMGR_CONFIG ({env_config})")
    if os.path.exists("devmgr.toml"):
        return of_file("devmgr.toml", "./devmgr.toml")
    from devmgr._paths import default_control_endpoint

    return (
        default_control_endpoint(),
        "the default, as none of -e, -c, $DEVMGR_ENDPOINT, $DEVMGR_CONFIG, ./devmgr.toml names one",
    )


def connectable(endpoint: str) -> str:
    """Turn a bind endpoint into one a client can connect to (`tcp://*:` -> 127.0.0.1)."""
    if endpoint.startswith("tcp://"):
        rest = endpoint[len("tcp://") :]
        host, sep, port = rest.rpartition(":")
        if sep and host in ("*", "0.0.0.0"):
            return f"tcp://127.0.0.1:{port}"
        if sep and host in ("[::]", "::"):
            return f"tcp://[::1]:{port}"
    return endpoint


def curve_from_env(
    client_cert: str | None = None, server_cert: str | None = None
) -> CurvePair | None:
    """Return the CURVE certificate pair from the arguments, else the environment.

    Raises:
        ConfigError: only one of the two certificates is given.
    """
    client_cert = client_cert or os.environ.get("DEVMGR_CURVE_CLIENT") or None
    server_cert = server_cert or os.environ.get("DEVMGR_CURVE_SERVER") or None
    if client_cert is None and server_cert is None:
        return None
    if client_cert is None or server_cert is None:
        raise ConfigError(
            "CURVE needs both certificates: --curve-client (the client's secret "
            "certificate) and --curve-server (the manager's public certificate)"
        )
    return (client_cert, server_cert)


def _load_curve_keys(curve: CurvePair) -> tuple[bytes, bytes, bytes]:
    """Return (client public, client secret, server public) Z85 keys from cert files.

    The client's secret certificate must not be readable by other users (as ssh).
    """
    from devmgr._certs import read_certificate

    client_path, server_path = (os.fspath(p) for p in curve)
    public, secret = read_certificate(client_path, secret=True)
    server_public, _ = read_certificate(server_path, secret=False)
    assert secret is not None
    return public, secret, server_public


# ---- the client --------------------------------------------------------------------


#: Commands whose work can outlast any fixed timeout: a drain, SIGKILL at the manager's
#: `stop_timeout`, a device's start, over one device or all of them. The client follows
#: them to their end for as long as the manager answers (see Client.request).
LONG_COMMANDS = frozenset({"start", "stop", "restart", "reload", "shutdown", "add", "remove"})

#: Device states that an operation in progress passes through.
_TRANSITIONAL = ("starting", "stopping", "backoff")


class Client:
    """Send control requests to a devmgr manager and return their results.

    A short request (`ping`, `status`, `stats`...) waits at most `timeout` seconds in
    total for its reply. A long one (LONG_COMMANDS: `start`, `stop`, `restart`, `reload`,
    `shutdown`, `add`, `remove`) waits as long as the operation takes, however long its
    drains and `stop_timeout` make it, as long as the manager shows it is alive: while no
    reply has come the client asks for the status of the devices concerned every second
    (or `timeout / 2`), and gives up only when one of these goes unanswered for `timeout`
    seconds. Results are plain JSON-shaped values as in docs/protocol.md. Not
    thread-safe: use one Client per thread.

    Args:
        endpoint: the manager's control endpoint; None resolves it as the CLI does
            ($DEVMGR_ENDPOINT, $DEVMGR_CONFIG, ./devmgr.toml, the default).
        timeout: seconds to wait for a reply (for a long command: for a sign of life).
        curve: `(client_secret_cert, server_public_cert)` certificate file paths, for a
            manager whose control socket uses CURVE.
        transport: "auto" (default): a built-in ZMTP 3.0 connection on a plain socket
            for ipc:// and tcp:// without CURVE, else pyzmq; "zmq" always uses pyzmq.

    Raises:
        ControlError: the manager answered with an error (`.code`, `.message`).
        ManagerUnreachable: no reply within `timeout`.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = 5.0,
        curve: CurvePair | None = None,
        *,
        transport: str = "auto",
    ) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        self.timeout = float(timeout)
        self._curve_keys = _load_curve_keys(curve) if curve is not None else None
        from devmgr import _zmtp

        # Without CURVE a plain-socket ZMTP connection saves `import zmq` (a quarter of
        # `devmgr status`'s run time); `transport="zmq"` forces pyzmq.
        if transport not in ("auto", "zmq", "zmtp"):
            raise ValueError(f"transport must be auto, zmq or zmtp, not {transport!r}")
        zmtp_ok = curve is None and _zmtp.supported(self.endpoint)
        if transport == "zmtp" and not zmtp_ok:
            raise ValueError(f"the zmtp transport takes no CURVE and no {self.endpoint!r}")
        self._use_zmtp = zmtp_ok and transport != "zmq"
        self._transport: _Transport | None = None
        # A random first id: a late reply to some earlier request cannot match a new
        # request's id by coincidence.
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self._closed = False
        self._streams: set[EventStream] = set()
        #: Called with a short text (e.g. "a stopping") while a long command is under
        #: way, each time the state of the devices it concerns changes; None: silent.
        self.on_progress: Callable[[str], None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    @property
    def curve_keys(self) -> tuple[bytes, bytes, bytes] | None:
        """(client public, client secret, server public) when CURVE is used, else None."""
        return self._curve_keys

    def close(self) -> None:
        """Close the connection; an unanswered request is dropped (linger 0)."""
        self._closed = True
        for stream in list(getattr(self, "_streams", ())):
            stream.close()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _connection(self) -> _Transport:
        if self._closed:
            raise DevmgrError("this Client is closed")
        if self._transport is None:
            from devmgr._paths import untrusted_default_endpoint

            untrusted = untrusted_default_endpoint(self.endpoint)
            if untrusted is not None:
                raise ManagerUnreachable(f"refusing to talk to {self.endpoint}: {untrusted}")
            if self._use_zmtp:
                self._transport = _ZmtpTransport(self.endpoint)
            else:
                self._transport = _PyzmqTransport(self.endpoint, self._curve_keys)
        return self._transport

    # ---- the request -------------------------------------------------------------------

    def request(
        self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request and return its `result`.

        A command of LONG_COMMANDS is followed to its end while the manager answers
        (see the class docstring); `timeout` then bounds the silence, not the operation.

        Raises:
            ControlError: an error reply.
            ManagerUnreachable: nothing listens, or no reply (for a long command: no sign
                of life) within `timeout` (default: the client's).
        """
        wait = self.timeout if timeout is None else float(timeout)
        follow = cmd in LONG_COMMANDS
        started = time.monotonic()
        deadline = started + wait
        request_id = self._take_id()
        payload = _encode(request_id, cmd, args)
        transport = self._connection()
        why = f"no reply from a devmgr manager at {self.endpoint} in {wait:g}s"
        listening: bool | None = None
        try:
            if transport.send(payload, deadline):
                follower = _Follower(self, cmd, args, wait) if follow else None
                while True:
                    wake = deadline if follower is None else follower.wake()
                    frames = transport.recv(wake)
                    if frames is None:
                        if follower is None or follower.given_up():
                            break
                        follower.probe(transport)
                        continue
                    reply = _parse_reply(frames)
                    if reply is None:
                        continue
                    if follower is not None and follower.heard(reply):
                        continue  # a sign of life, not the answer
                    if not _answers(reply, request_id):
                        continue  # a stale or foreign reply: not ours
                    if reply.get("ok") is True:
                        return reply.get("result")
                    error = reply.get("error")
                    if not isinstance(error, dict):
                        raise ControlError("internal", f"malformed error reply: {reply!r}")
                    raise ControlError(str(error.get("code")), str(error.get("message", "")))
                if follower is not None and follower.probes:
                    why = (
                        f"no reply from a devmgr manager at {self.endpoint}: it stopped "
                        f"answering while `{cmd}` was under way (no sign of life for "
                        f"{wait:g}s, after {time.monotonic() - started:.1f}s)"
                    )
            if transport.reached:
                listening = True
                why += ": something listens there but did not answer (a stopped manager?)"
        except _NothingListens as exc:
            listening = False
            why = f"no devmgr manager at {self.endpoint}: nothing listens there ({exc.why})"
            why += _missing_folder(self.endpoint)
        except _Unreachable as exc:
            listening = True if transport.reached else None
            why = f"no reply from a devmgr manager at {self.endpoint}: {exc}"
        # A new connection drops the unanswered request from the queue, so a manager
        # that comes back later neither runs it nor answers into the next request.
        transport.close()
        self._transport = None
        raise ManagerUnreachable(why, listening=listening)

    def _take_id(self) -> int:
        request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFFFFFF
        return request_id

    # ---- one method per command ----------------------------------------------------------

    def ping(self) -> str:
        """Return "pong" when the manager answers."""
        return str(self.request("ping"))

    def version(self) -> dict[str, Any]:
        """Return `{"version": ..., "protocol": 1}` of the manager."""
        return dict(self.request("version"))

    def status(self, *names: str) -> dict[str, Any]:
        """Return `{"manager": {...}, "devices": [...]}` for the named devices (default all)."""
        return dict(self.request("status", {"names": list(names)} if names else None))

    def start(self, *names: str) -> list[dict[str, Any]]:
        """Start the named devices (`"*"` = all); return their status once started."""
        return list(self.request("start", {"names": _names(names)}))

    def stop(self, *names: str) -> list[dict[str, Any]]:
        """Stop the named devices (`"*"` = all); return their status once stopped."""
        return list(self.request("stop", {"names": _names(names)}))

    def restart(self, *names: str, rolling: bool = False) -> list[dict[str, Any]]:
        """Restart the named devices (`"*"` = all); return their status once running.

        `rolling`: one at a time in dependency order, each once the previous is running
        again; a ControlError names the first that did not come back.
        """
        args: dict[str, Any] = {"names": _names(names)}
        if rolling:
            args["rolling"] = True
        return list(self.request("restart", args))

    def pause(self, name: str) -> dict[str, Any]:
        """Pause a device (its loop stops reading); return its status."""
        return dict(self.request("pause", {"name": name}))

    def resume(self, name: str) -> dict[str, Any]:
        """Resume a paused device; return its status."""
        return dict(self.request("resume", {"name": name}))

    def stats(self, name: str) -> dict[str, int]:
        """Return the device's 8 STATISTICS counters (docs/protocol.md) by their `stats()` keys."""
        return dict(self.request("stats", {"name": name}))

    def logs(self, name: str, lines: int = 50, after: int | None = None) -> dict[str, Any]:
        """Return a device's stderr lines from the manager's buffer (docs/protocol.md `logs`).

        The last `lines` lines; with `after` (the `last_seq` of an earlier answer) the
        first `lines` lines written since, which is how `devmgr logs -f` follows.
        """
        args: dict[str, Any] = {"name": name, "lines": lines}
        if after is not None:
            args["after"] = after
        return dict(self.request("logs", args))

    def add(self, spec: Any) -> dict[str, Any]:
        """Add and start a device from a `DeviceSpec` or a dict with `name`; return its status."""
        return dict(self.request("add", {"spec": _spec_data(spec)}))

    def remove(self, name: str) -> None:
        """Stop a device and forget it."""
        self.request("remove", {"name": name})

    def reload(self, config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Re-read the manager's config file; return its path and the names by change.

        Args:
            config: the file the caller means; when the manager runs another one, the
                reload is refused (`conflict`) instead of re-reading the manager's own.
        """
        if config is None:
            return dict(self.request("reload"))
        return dict(self.request("reload", {"config": os.path.abspath(config)}))

    def shutdown(self) -> None:
        """Stop every device, then the manager; return once the devices have stopped."""
        self.request("shutdown")

    def events(
        self, devices: list[str] | None = None, kinds: list[str] | None = None
    ) -> EventStream:
        """The manager's events as an iterator of event dicts (docs/events.md).

        `for event in client.events(kinds=["device.exited"]): ...`. `devices` keeps the
        events of those devices; `kinds` the topics (or topic prefixes such as
        `device.`) to subscribe to. The stream ends when it or the client is closed.
        """
        from devmgr._events import EventStream

        stream = EventStream(
            lambda: connectable(self.status()["manager"]["events"]),
            self._curve_keys,
            devices,
            kinds,
            self._streams.discard,
        )
        self._streams.add(stream)
        return stream


def _spec_data(spec: Any) -> dict[str, Any]:
    """The `spec` argument of `add`: a DeviceSpec's JSON form, or a dict as it is."""
    if hasattr(spec, "model_dump"):
        return dict(spec.model_dump(mode="json", by_alias=True))
    if isinstance(spec, Mapping):
        return dict(spec)
    raise TypeError(f"add() takes a DeviceSpec or a dict, not {type(spec).__name__}")


def _encode(request_id: int, cmd: str, args: Mapping[str, Any] | None) -> bytes:
    message: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "cmd": cmd}
    if args:
        message["args"] = dict(args)
    return json.dumps(message).encode()


class _Follower:
    """Keep a long request alive: ask for the status of its devices while no reply comes.

    Any answer to such a probe (a status, or an error: the manager is alive either way)
    renews the wait; a probe unanswered for `wait` seconds means the manager stopped
    answering.
    """

    def __init__(self, client: Client, cmd: str, args: Mapping[str, Any] | None, wait: float):
        self.client = client
        self.wait = wait
        self.interval = min(1.0, wait / 2)
        self.last_heard = time.monotonic()
        self.outstanding: tuple[int, float] | None = None
        self.probes = 0
        self.shown = ""
        names: list[str] | None = None
        if args and isinstance(args.get("names"), list) and "*" not in args["names"]:
            names = [n for n in args["names"] if isinstance(n, str)]
        elif args and isinstance(args.get("name"), str):
            names = [args["name"]]
        elif args and isinstance(args.get("spec"), Mapping):
            spec_name = args["spec"].get("name")
            names = [spec_name] if isinstance(spec_name, str) else None
        self.probe_args = {"names": names} if names else None
        self.cmd = cmd

    def wake(self) -> float:
        if self.outstanding is not None:
            return self.outstanding[1] + self.wait
        return self.last_heard + self.interval

    def given_up(self) -> bool:
        return self.outstanding is not None and time.monotonic() >= self.outstanding[1] + self.wait

    def probe(self, transport: _Transport) -> None:
        if self.outstanding is not None:
            return
        now = time.monotonic()
        probe_id = self.client._take_id()
        self.outstanding = (probe_id, now)
        self.probes += 1
        transport.send(_encode(probe_id, "status", self.probe_args), now + self.wait)

    def heard(self, reply: dict[str, Any]) -> bool:
        """Return True when `reply` answers a probe (and note the sign of life)."""
        if self.outstanding is None or reply.get("id") != self.outstanding[0]:
            return False
        self.outstanding = None
        self.last_heard = time.monotonic()
        result = reply.get("result")
        if reply.get("ok") is True and isinstance(result, dict):
            self._progress(result.get("devices"))
        return True

    def _progress(self, devices: object) -> None:
        if self.client.on_progress is None or not isinstance(devices, list):
            return
        busy = [
            f"{d.get('name')} {d.get('state')}"
            for d in devices
            if isinstance(d, dict) and d.get("state") in _TRANSITIONAL
        ]
        shown = ", ".join(busy[:5]) + (f" and {len(busy) - 5} more" if len(busy) > 5 else "")
        if shown and shown != self.shown:
            self.shown = shown
            try:
                self.client.on_progress(shown)
            except Exception:  # a display callback must not cost the request
                pass


def _names(names: tuple[str, ...]) -> list[str]:
    if not names:
        raise ValueError('give at least one device name, or "*" for all')
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"device names are strings, not {type(name).__name__}")
    return list(names)


def _answers(reply: dict[str, Any], request_id: int) -> bool:
    """Return True when `reply` answers the request with `request_id`."""
    if reply.get("id") == request_id:
        return True
    # The manager answers a request it could not read (too large, say) with id null. As
    # a connection is replaced after every timeout, the only request it can be is ours.
    return reply.get("id") is None and reply.get("ok") is False


def _parse_reply(frames: list[bytes]) -> dict[str, Any] | None:
    # A DEALER gets the reply as one frame; tolerate a leading empty delimiter.
    if not frames:
        return None
    try:
        reply = json.loads(frames[-1])
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


# ---- transports ----------------------------------------------------------------------


def _missing_folder(endpoint: str) -> str:
    """Say that an ipc endpoint's folder is missing too (an `rm -rf` of it?), else ''."""
    folder = os.path.dirname(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else ""
    if not folder or os.path.isdir(folder):
        return ""
    return (
        f"; its folder {folder} is missing too (never made, or removed while a manager ran: "
        "a running manager makes its sockets again within a second)"
    )


class _Unreachable(Exception):
    """The transport gave up: nothing listens, the handshake failed, the peer left."""


class _NothingListens(_Unreachable):
    """Nothing listens at the endpoint: said at once, not after the timeout."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(why)


def _probe(endpoint: str, deadline: float) -> bool:
    """Return True when a connection to `endpoint` can be made (for the pyzmq transport,
    whose connect() never says whether anything listens).

    Raises:
        _NothingListens: no socket file, a stale one, connection refused.
    """
    from devmgr import _zmtp

    if not _zmtp.supported(endpoint):
        return False
    try:
        _zmtp.probe(endpoint, deadline)
    except _zmtp.NothingListens as exc:
        raise _NothingListens(exc.why) from None
    except (_zmtp.ZmtpTimeout, OSError):
        return False  # undecided: let libzmq try for the whole timeout
    return True


class _Transport:
    #: True once a connection was made (something listens at the endpoint).
    reached = False

    def send(self, payload: bytes, deadline: float) -> bool:
        """Send one request frame; False when the deadline passed first."""
        raise NotImplementedError

    def recv(self, deadline: float) -> list[bytes] | None:
        """Return the next message, or None when the deadline passed first."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _ZmtpTransport(_Transport):
    """A DEALER on a plain socket (devmgr._zmtp): no pyzmq import, no I/O thread."""

    def __init__(self, endpoint: str) -> None:
        from devmgr._zmtp import ZmtpDealer

        self._dealer = ZmtpDealer(endpoint)

    def send(self, payload: bytes, deadline: float) -> bool:
        from devmgr._zmtp import ConnectionLost, NothingListens, ZmtpError, ZmtpTimeout

        try:
            # A manager that restarted since the last request closed our connection.
            if self._dealer.connected and self._dealer.peer_closed():
                self._dealer.close()
            if not self._dealer.connected:
                self.reached = False
                self._dealer.connect(deadline)
            self._dealer.send([payload], deadline)
        except ZmtpTimeout:
            self.reached = self._dealer.reached
            return False
        except NothingListens as exc:
            raise _NothingListens(exc.why) from exc
        except ZmtpError as exc:
            self.reached = self._dealer.reached
            raise _Unreachable(str(exc)) from exc
        except (ConnectionLost, OSError) as exc:
            self.reached = self._dealer.reached
            raise _Unreachable(f"connection lost: {exc}") from exc
        self.reached = True
        return True

    def recv(self, deadline: float) -> list[bytes] | None:
        from devmgr._zmtp import ConnectionLost, ZmtpError, ZmtpTimeout

        try:
            return self._dealer.recv(deadline)
        except ZmtpTimeout:
            return None
        except ZmtpError as exc:
            raise _Unreachable(str(exc)) from exc
        except (ConnectionLost, OSError) as exc:
            raise _Unreachable(f"connection lost: {exc}") from exc

    def close(self) -> None:
        self._dealer.close()


class _PyzmqTransport(_Transport):
    """A pyzmq DEALER (used for CURVE and for endpoints the ZMTP transport does not take)."""

    def __init__(self, endpoint: str, curve_keys: tuple[bytes, bytes, bytes] | None) -> None:
        import zmq

        self._zmq = zmq
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        from devmgr._zmtp import MAX_FRAME_BYTES

        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # as the ZMTP transport's cap
        if curve_keys is not None:
            public, secret, server_public = curve_keys
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self._ctx.term()
            raise ConfigError(f"cannot connect to {endpoint!r}: {exc.strerror}") from exc
        self._sock = sock
        self._endpoint = endpoint

    def send(self, payload: bytes, deadline: float) -> bool:
        zmq = self._zmq
        # libzmq's connect() never fails for want of a listener; it would wait out the
        # whole timeout. A plain connection first says at once when nothing listens.
        self.reached = _probe(self._endpoint, deadline)
        # A DEALER queues to a pipe that exists from connect() on, so this waits only
        # when the queue is full (a manager that stopped reading).
        wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
        if not self._sock.poll(wait_ms, zmq.POLLOUT):
            return False
        try:
            self._sock.send(payload, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def recv(self, deadline: float) -> list[bytes] | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._sock.poll(math.ceil(remaining * 1000), self._zmq.POLLIN):
            return None
        return self._sock.recv_multipart(self._zmq.NOBLOCK)

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)
        if not self._ctx.closed:
            self._ctx.term()
