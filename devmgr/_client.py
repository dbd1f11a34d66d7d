"""`devmgr.Client`: send control requests to a running manager (CONTRACT 2, 4, 5.1).

The client path is kept cheap to start: no pydantic, pyzmq imported when the first
request is sent, and the endpoint found by reading `[manager] control` with tomllib
rather than by validating the whole config.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devmgr._errors import ConfigError, ControlError, DevmgrError, ManagerUnreachable

if TYPE_CHECKING:
    import zmq

PROTOCOL_VERSION = 1

CurvePair = tuple["str | os.PathLike[str]", "str | os.PathLike[str]"]


# ---- endpoint resolution (CONTRACT 6) ------------------------------------------------


def control_endpoint_of(config_path: str | os.PathLike[str]) -> str:
    """Return the control endpoint a config file sets (or the default one).

    Reads only `[manager] control` with tomllib: validating the whole config would cost
    the client pydantic. A relative ipc path resolves against the config file's folder.

    Raises:
        ConfigError: the file cannot be read or is not TOML.
    """
    import tomllib

    path = Path(config_path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    manager = data.get("manager")
    control = manager.get("control") if isinstance(manager, dict) else None
    if control is None:
        from devmgr._paths import default_control_endpoint

        return default_control_endpoint()
    if not isinstance(control, str):
        raise ConfigError(f"{path}: manager.control must be a string")
    if control.startswith("ipc://") and not control.startswith("ipc:///"):
        control = f"ipc://{(path.parent / control[len('ipc://') :]).absolute()}"
    return control


def resolve_endpoint(endpoint: str | None = None, config: str | None = None) -> str:
    """Return the control endpoint to use (CONTRACT 6).

    In order: `endpoint`; the control endpoint of the `config` file; $DEVMGR_ENDPOINT;
    that of $DEVMGR_CONFIG or ./devmgr.toml; the default ipc endpoint in the runtime dir.
    """
    if endpoint:
        return connectable(endpoint)
    if config:
        return connectable(control_endpoint_of(config))
    env = os.environ.get("DEVMGR_ENDPOINT")
    if env:
        return connectable(env)
    env_config = os.environ.get("DEVMGR_CONFIG")
    if env_config:
        return connectable(control_endpoint_of(env_config))
    if os.path.exists("devmgr.toml"):
        return connectable(control_endpoint_of("devmgr.toml"))
    from devmgr._paths import default_control_endpoint

    return default_control_endpoint()


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
    """Return (client public, client secret, server public) Z85 keys from cert files."""
    from zmq.auth import load_certificate

    client_path, server_path = (os.fspath(p) for p in curve)
    try:
        public, secret = load_certificate(client_path)
        server_public, _ = load_certificate(server_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a CURVE certificate: {exc}") from exc
    if not secret:
        raise ConfigError(f"{client_path}: no secret key (give the client's *.key_secret file)")
    return public, secret, server_public


# ---- the client --------------------------------------------------------------------


class Client:
    """Send control requests to a devmgr manager and return their results.

    Each method sends one request and waits at most `timeout` seconds in total for its
    reply. Results are plain JSON-shaped values as in CONTRACT 4. Not thread-safe: use
    one Client per thread.

    Args:
        endpoint: the manager's control endpoint; None resolves it as the CLI does
            ($DEVMGR_ENDPOINT, $DEVMGR_CONFIG, ./devmgr.toml, the default).
        timeout: seconds to wait for each reply.
        curve: `(client_secret_cert, server_public_cert)` certificate file paths, for a
            manager whose control socket uses CURVE.

    Raises:
        ControlError: the manager answered with an error (`.code`, `.message`).
        ManagerUnreachable: no reply within `timeout`.
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
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._poller: zmq.Poller | None = None
        # Ids start at a per-client random offset so that replies can never be mistaken
        # for those of another Client sharing the socket's history (there is none, but
        # a stale reply on a reused socket must not match a new request).
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self._closed = False

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

    def close(self) -> None:
        """Close the socket and its context; unsent requests are dropped (linger 0)."""
        self._closed = True
        self._drop_socket()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
            self._poller = None

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is not None:
            return self._sock
        if self._closed:
            raise DevmgrError("this Client is closed")
        import zmq

        if self._ctx is None:
            self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve_keys is not None:
            public, secret, server_public = self._curve_keys
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(f"cannot connect to {self.endpoint!r}: {exc.strerror}") from exc
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        return sock

    # ---- the request -------------------------------------------------------------------

    def request(
        self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request and return its `result`.

        Raises:
            ControlError: an error reply.
            ManagerUnreachable: no reply within `timeout` (default: the client's).
        """
        import zmq

        wait = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + wait
        request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFFFFFF
        message: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id, "cmd": cmd}
        if args:
            message["args"] = dict(args)
        payload = json.dumps(message).encode()
        sock = self._socket()
        try:
            # DEALER queues to a pipe that exists from connect() on, so this only waits
            # when the queue is full (a manager that stopped reading).
            if not sock.poll(max(0.0, wait) * 1000, zmq.POLLOUT):
                raise zmq.Again()
            sock.send(payload, zmq.NOBLOCK)
            assert self._poller is not None
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._poller.poll(remaining * 1000):
                    break
                frames = sock.recv_multipart(zmq.NOBLOCK)
                reply = _parse_reply(frames)
                if reply is None or reply.get("id") != request_id:
                    continue  # a stale or foreign reply: not ours
                if reply.get("ok") is True:
                    return reply.get("result")
                error = reply.get("error")
                if not isinstance(error, dict):
                    raise ControlError("internal", f"malformed error reply: {reply!r}")
                raise ControlError(str(error.get("code")), str(error.get("message", "")))
        except zmq.Again:
            pass
        # Recreating the socket drops the unanswered request from its queue, so a
        # manager that comes back later neither runs it nor answers into the next one.
        self._drop_socket()
        raise ManagerUnreachable(f"no reply from a devmgr manager at {self.endpoint} in {wait:g}s")

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

    def restart(self, *names: str) -> list[dict[str, Any]]:
        """Restart the named devices (`"*"` = all); return their status once running."""
        return list(self.request("restart", {"names": _names(names)}))

    def pause(self, name: str) -> dict[str, Any]:
        """Pause a device (its loop stops reading); return its status."""
        return dict(self.request("pause", {"name": name}))

    def resume(self, name: str) -> dict[str, Any]:
        """Resume a paused device; return its status."""
        return dict(self.request("resume", {"name": name}))

    def stats(self, name: str) -> dict[str, int]:
        """Return the device's 8 counters of CONTRACT 2.1 by their `stats()` keys."""
        return dict(self.request("stats", {"name": name}))

    def add(self, spec: Any) -> dict[str, Any]:
        """Add and start a device from a `DeviceSpec` or a dict with `name`; return its status."""
        if hasattr(spec, "model_dump"):
            data = spec.model_dump(mode="json", by_alias=True)
        elif isinstance(spec, Mapping):
            data = dict(spec)
        else:
            raise TypeError(f"add() takes a DeviceSpec or a dict, not {type(spec).__name__}")
        return dict(self.request("add", {"spec": data}))

    def remove(self, name: str) -> None:
        """Stop a device and forget it."""
        self.request("remove", {"name": name})

    def reload(self) -> dict[str, list[str]]:
        """Re-read the manager's config file; return the added/removed/changed names."""
        return dict(self.request("reload"))

    def shutdown(self) -> None:
        """Stop every device, then the manager; return once the devices have stopped."""
        self.request("shutdown")


def _names(names: tuple[str, ...]) -> list[str]:
    if not names:
        raise ValueError('give at least one device name, or "*" for all')
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"device names are strings, not {type(name).__name__}")
    return list(names)


def _parse_reply(frames: list[bytes]) -> dict[str, Any] | None:
    # A DEALER gets the reply as one frame; tolerate a leading empty delimiter.
    if not frames:
        return None
    try:
        reply = json.loads(frames[-1])
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None
