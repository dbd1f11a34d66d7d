"""CURVE on the control socket: the server keys, the ZAP handler, `devmgr keygen`.

Authorisation is ZAP (ZeroMQ RFC 27): libzmq asks the handler bound at
`inproc://zeromq.zap.01` of the socket's context about each CURVE client, and only keys
whose public certificate lies in `authorized_keys` get through; any other key gets
nothing (libzmq drops the handshake). The folder is read on every handshake, so adding
or deleting a certificate takes effect for the next connection without a restart.

The handler is a small thread of our own rather than pyzmq's ThreadAuthenticator: it
closes its sockets when the context is terminated, so `ctx.term()` never hangs on it
and a manager that forgets to stop it still shuts down.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import zmq
from zmq.utils import z85

from devmgr._errors import ConfigError

log = logging.getLogger("devmgr")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class CurveSettings(Protocol):
    """What enable_curve_server needs of `[manager.curve]` (devmgr._spec.CurveSpec)."""

    @property
    def secret_key(self) -> Any: ...

    @property
    def authorized_keys(self) -> Any: ...


def load_secret_certificate(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """Return (public, secret) Z85 keys of a `*.key_secret` certificate file.

    Raises:
        ConfigError: the file cannot be read, holds no secret key, or other users may
            read it (devmgr._certs.read_certificate).
    """
    from devmgr._certs import read_certificate

    public, secret = read_certificate(path, secret=True)
    assert secret is not None
    return public, secret


# path -> the problem last logged for it, so that a bad file is reported once (and again
# when its problem changes), not at every handshake.
_REPORTED: dict[str, str] = {}
_REPORTED_LOCK = threading.Lock()  # several managers' ZAP threads may share it


def _report(path: str, problem: str | None, *, folder: bool = False) -> None:
    with _REPORTED_LOCK:
        _report_locked(path, problem, folder)


def _report_locked(path: str, problem: str | None, folder: bool) -> None:
    if problem is None:
        _REPORTED.pop(path, None)
    elif _REPORTED.get(path) != problem:
        _REPORTED[path] = problem
        if folder:
            log.error("%s", problem)
        else:
            log.warning("skipped an authorized CURVE key: %s", problem)


def authorized_public_keys(folder: str | os.PathLike[str]) -> set[bytes]:
    """Return the Z85 public keys of the `*.key` certificates in `folder`.

    A file that cannot be used (unreadable, empty, garbage, too large, a folder or a
    FIFO named `*.key`) is skipped with a warning naming it; the others still count.
    An unreadable folder gives no keys (and an error in the log).
    """
    from devmgr._certs import read_certificate

    where = os.fspath(folder)
    try:
        names = sorted(e.name for e in os.scandir(where) if e.name.endswith(".key"))
    except OSError as exc:
        problem = f"cannot read the authorized CURVE keys folder {where}: {exc.strerror}"
        _report(where, problem, folder=True)
        return set()
    _report(where, None)
    keys: set[bytes] = set()
    seen = set()
    for name in names:
        path = os.path.join(where, name)
        seen.add(path)
        try:
            public, _ = read_certificate(path, secret=False)
        except ConfigError as exc:
            _report(path, str(exc))
            continue
        _report(path, None)
        keys.add(public)
    prefix = where.rstrip(os.sep) + os.sep
    with _REPORTED_LOCK:
        for gone in [p for p in _REPORTED if p.startswith(prefix) and p not in seen]:
            del _REPORTED[gone]
    return keys


class CurveAuthorizer:
    """Answer libzmq's ZAP requests for one context from a thread of its own."""

    def __init__(self, ctx: zmq.Context[Any], authorized_keys: str | os.PathLike[str]) -> None:
        self.context = ctx
        self.authorized_keys = Path(authorized_keys)
        self._stop_endpoint = f"inproc://devmgr-zap-stop-{id(self):x}"
        # Both sockets are made here, before the handler is needed, so the first client
        # cannot race the thread's start; the thread owns them from then on.
        self._zap = ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._stop = ctx.socket(zmq.PAIR)
        self._stop.setsockopt(zmq.LINGER, 0)
        try:
            self._zap.bind(ZAP_ENDPOINT)
            self._stop.bind(self._stop_endpoint)
        except zmq.ZMQError:
            self._zap.close()
            self._stop.close()
            raise
        self._thread = threading.Thread(target=self._run, name="devmgr-zap", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the handler thread (optional: terminating the context also ends it)."""
        if not self._thread.is_alive() or self.context.closed:
            return
        # A throwaway socket, so no socket of ours outlives this call to block ctx.term().
        poke = self.context.socket(zmq.PAIR)
        poke.setsockopt(zmq.LINGER, 0)
        try:
            poke.connect(self._stop_endpoint)
            poke.send(b"STOP")
            self._thread.join(timeout)
        finally:
            poke.close()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._stop, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._stop in events:
                    return
                if self._zap in events:
                    self._answer(self._zap.recv_multipart())
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:  # pragma: no cover - libzmq failure
            log.error("the CURVE authorisation thread stopped: %s", exc)
        finally:
            self._zap.close(linger=0)
            self._stop.close(linger=0)

    def _answer(self, frames: list[bytes]) -> None:
        # RFC 27: version, request id, domain, address, routing id, mechanism, credentials.
        if len(frames) < 6:
            return  # not a ZAP request: nothing to answer it with
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        status, text, user = b"400", b"unauthorised", b""
        if version != b"1.0":
            status, text = b"500", b"unsupported ZAP version"
        elif mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            key = z85.encode(credentials[0])
            if key in authorized_public_keys(self.authorized_keys):
                status, text, user = b"200", b"OK", key
            else:
                log.warning(
                    "refused a CURVE client from %s: key %s is not in %s",
                    address.decode(errors="replace") or "?",
                    key.decode(),
                    self.authorized_keys,
                )
        self._zap.send_multipart([version, request_id, status, text, user, b""])


_AUTHORIZERS: dict[int, CurveAuthorizer] = {}
_AUTHORIZERS_LOCK = threading.Lock()


def enable_curve_server(
    ctx: zmq.Context[Any], sock: zmq.Socket[Any], curve_spec: CurveSettings
) -> CurveAuthorizer:
    """Make `sock` a CURVE server admitting only the keys in `curve_spec.authorized_keys`.

    Call before `bind`. The ZAP handler runs in a thread tied to `ctx`; it ends by itself
    when the context is terminated, or earlier with `.stop()` on the returned object.

    Raises:
        ConfigError: the secret certificate cannot be read.
    """
    public, secret = load_secret_certificate(curve_spec.secret_key)
    if not authorized_public_keys(curve_spec.authorized_keys):
        log.warning(
            "no usable public key in %s: no CURVE client can connect until one is added",
            curve_spec.authorized_keys,
        )
    with _AUTHORIZERS_LOCK:
        for key in [k for k, a in _AUTHORIZERS.items() if not a.alive]:
            del _AUTHORIZERS[key]  # their contexts are gone; let them be freed
        auth = _AUTHORIZERS.get(id(ctx))
        if auth is None or auth.context is not ctx:
            auth = CurveAuthorizer(ctx, curve_spec.authorized_keys)
            _AUTHORIZERS[id(ctx)] = auth
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    # Without this libzmq 4.3 lets every CURVE client in when no ZAP handler answers
    # (say the thread died); with it such a handshake fails instead.
    if hasattr(zmq, "ZAP_ENFORCE_DOMAIN"):
        try:
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        except zmq.ZMQError:  # pragma: no cover - libzmq built without it
            pass
    sock.setsockopt(zmq.ZAP_DOMAIN, b"devmgr")
    return auth


def create_certificate_pair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write `NAME.key` (public) and `NAME.key_secret` (mode 0600 from creation on).

    Raises:
        FileExistsError: either file exists already (keys are never overwritten).
        ValueError: `name` is not a plain file name.
    """
    from devmgr._certs import write_certificate_pair

    public, secret = zmq.curve_keypair()
    return write_certificate_pair(directory, name, public, secret)
