"""The manager's control socket: parse requests, dispatch them, answer every one.

A request is one UTF-8 JSON frame on a ROUTER socket (a REQ client's empty delimiter is
kept and mirrored). Parsing goes through the pydantic models of devmgr._protocol and the
COMMANDS table; nothing a client sends is ever executed or imported: `add` takes a
device spec, which is data. Long operations answer when they finish, so a slow restart
never holds up another client's `status`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq
from pydantic import BaseModel, ValidationError

from devmgr._errors import ControlError
from devmgr._protocol import COMMANDS, RawJSON, Request
from devmgr._wire import MAX_REQUEST_BYTES, PROTOCOL_VERSION

if TYPE_CHECKING:
    from devmgr._manager import Manager

log = logging.getLogger("devmgr")

# Requests handled per wake-up before the loop looks at its other sockets again.
_BURST = 256

Reply = Callable[[Any, ControlError | None], None]


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


class ControlServer:
    """Serve the control protocol (docs/protocol.md) on a bound ROUTER, on the loop thread."""

    def __init__(self, manager: Manager, sock: zmq.Socket[bytes]) -> None:
        self.manager = manager
        self.socket = sock
        self._handlers: dict[str, Callable[[Any, Reply], None]] = {
            "ping": lambda a, r: r("pong", None),
            "version": lambda a, r: r(manager.version_dict(), None),
            "status": lambda a, r: r(manager.status_json(a.names), None),
            "start": lambda a, r: manager.op_names("start", a.names, r),
            "stop": lambda a, r: manager.op_names("stop", a.names, r),
            "restart": lambda a, r: manager.op_names("restart", a.names, r),
            "pause": lambda a, r: manager.op_device_command("pause", a.name, r),
            "resume": lambda a, r: manager.op_device_command("resume", a.name, r),
            "stats": lambda a, r: manager.op_device_command("stats", a.name, r),
            "add": lambda a, r: manager.op_add(a.spec, r),
            "remove": lambda a, r: manager.op_remove(a.name, r),
            "reload": lambda a, r: manager.op_reload(None, r, expect_path=a.config),
            "shutdown": lambda a, r: manager.op_shutdown(r),
        }
        assert set(self._handlers) == set(COMMANDS), "every command needs a handler"

    def close(self) -> None:
        self.socket.close(linger=500)

    def on_readable(self) -> None:
        for _ in range(_BURST):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(frames)
            except Exception:  # a bug must cost one request, never the manager
                log.exception("internal error while handling a control request")

    def _handle(self, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        if rest and rest[0] == b"":
            envelope, body = [identity, b""], rest[1:]
        else:
            envelope, body = [identity], rest
        send = self._sender(envelope)
        if len(body) != 1:
            send(
                None, None, ControlError("bad_request", f"a request is one frame; got {len(body)}")
            )
            return
        raw = body[0]
        if len(raw) > MAX_REQUEST_BYTES:
            send(None, None, ControlError("too_large", f"{len(raw)} bytes; the limit is 1 MiB"))
            return
        request_id: Any = None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            send(None, None, ControlError("bad_request", f"not JSON: {exc}"))
            return
        if isinstance(data, dict):
            request_id = data.get("id")
        try:
            request = Request.model_validate(data)
        except ValidationError as exc:
            send(request_id, None, ControlError("bad_request", _describe(exc)))
            return
        args_model = COMMANDS.get(request.cmd)
        if args_model is None:
            known = ", ".join(sorted(COMMANDS))
            error = ControlError("unknown_command", f"{request.cmd!r}; commands: {known}")
            send(request_id, None, error)
            return
        try:
            args: BaseModel = args_model.model_validate(request.args)
        except ValidationError as exc:
            send(request_id, None, ControlError("bad_request", f"args: {_describe(exc)}"))
            return

        def reply(result: Any, error: ControlError | None) -> None:
            send(request_id, result, error)

        try:
            self._handlers[request.cmd](args, reply)
        except ControlError as exc:
            reply(None, exc)
        except Exception as exc:
            log.exception("internal error in %s", request.cmd)
            reply(None, ControlError("internal", f"{type(exc).__name__}: {exc}"))

    def _sender(self, envelope: list[bytes]) -> Callable[[Any, Any, ControlError | None], None]:
        answered = False

        def send(request_id: Any, result: Any, error: ControlError | None) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            reply: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request_id}
            if error is None:
                reply["ok"] = True
                reply["result"] = result
            else:
                reply["ok"] = False
                reply["error"] = {"code": error.code, "message": error.message}
            try:
                if isinstance(result, RawJSON) and error is None:
                    head = json.dumps({"v": PROTOCOL_VERSION, "id": request_id, "ok": True})
                    payload = f'{head[:-1]}, "result": {result}}}'.encode()
                else:
                    payload = json.dumps(reply).encode()
            except (TypeError, ValueError):
                payload = json.dumps(
                    {
                        "v": 1,
                        "id": None,
                        "ok": False,
                        "error": {"code": "internal", "message": "unserialisable reply"},
                    }
                ).encode()
            if self.socket.closed:
                return
            try:
                # a client that vanished is simply not answered (ROUTER drops it)
                self.socket.send_multipart([*envelope, payload], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("could not answer a control request: %s", exc)

        return send
