"""The manager's control socket: parse requests, dispatch them, answer every one.

A request is one UTF-8 JSON frame on a ROUTER socket (a REQ client's empty delimiter is
kept and mirrored). Parsing and dispatch go through the command table (devmgr._commands)
and the pydantic models of devmgr._protocol; nothing a client sends is ever executed or
imported: `add` takes a device spec, which is data. Long operations answer when they
finish, so a slow restart never holds up another client's `status`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

import zmq
from pydantic import BaseModel, ValidationError

from devmgr._commands import COMMANDS, Operations
from devmgr._errors import ControlError
from devmgr._protocol import RawJSON, Request
from devmgr._tasks import spawn
from devmgr._wire import MAX_ERROR_CHARS, MAX_ID_BYTES, MAX_REQUEST_BYTES, PROTOCOL_VERSION

log = logging.getLogger("devmgr")

# Requests handled per wake-up before the loop looks at its other sockets again.
_BURST = 256

# Problems listed in one error reply; the rest are counted, not listed.
_LISTED_PROBLEMS = 20
# More keys than this in a request or its args is refused whole, not key by key.
_MAX_KEYS = 16


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for err in errors[:_LISTED_PROBLEMS]:
        where = ".".join(_short(str(p)) for p in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']}")
    if len(errors) > _LISTED_PROBLEMS:
        parts.append(f"and {len(errors) - _LISTED_PROBLEMS} more problems")
    return "; ".join(parts)


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {_short(text)} is out of range (it would be infinite)")
    return value


def _id_problem(request_id: Any) -> str | None:
    """Say why `request_id` cannot be echoed (too long), else None."""
    try:
        size = len(json.dumps(request_id, allow_nan=False))
    except (ValueError, TypeError, RecursionError):
        size = MAX_ID_BYTES + 1
    if size > MAX_ID_BYTES:
        return f"id: {size} bytes as JSON; the limit is {MAX_ID_BYTES} (it is echoed in the reply)"
    return None


def _bounded(message: str) -> str:
    if len(message) <= MAX_ERROR_CHARS:
        return message
    cut = len(message) - MAX_ERROR_CHARS
    return f"{message[:MAX_ERROR_CHARS]}... ({cut} more characters)"


class _Refusal(Exception):
    """A frame that is not a valid request: the error to answer, with its id if known."""

    def __init__(self, request_id: Any, code: str, message: str) -> None:
        self.request_id = request_id
        self.error = ControlError(code, message)


def _decode(raw: bytes) -> tuple[Any, str, BaseModel]:
    """Parse one request frame into (id, command, args); raise _Refusal if it is none.

    Every step is bounded by the frame's size, and so is the error it may give.
    """
    try:
        # strict JSON: NaN, Infinity and 1e999 would come back as invalid JSON
        data = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise _Refusal(None, "bad_request", f"not JSON: {_short(str(exc), 200)}") from None
    request_id: Any = None
    if isinstance(data, dict):
        request_id = data.get("id")
        problem = _id_problem(request_id)
        if problem is not None:
            raise _Refusal(None, "bad_request", problem)
        if len(data) > _MAX_KEYS:
            keys = ", ".join(Request.model_fields)
            raise _Refusal(request_id, "bad_request", f"{len(data)} keys; a request has {keys}")
    try:
        request = Request.model_validate(data)
    except ValidationError as exc:
        raise _Refusal(request_id, "bad_request", _describe(exc)) from None
    command = COMMANDS.get(request.cmd)
    if command is None:
        known = ", ".join(sorted(COMMANDS))
        raise _Refusal(request_id, "unknown_command", f"{request.cmd!r}; commands: {known}")
    args_model = command.args
    if len(request.args) > _MAX_KEYS:
        takes = ", ".join(args_model.model_fields) or "none"
        message = f"args: {len(request.args)} keys; it takes {takes}"
        raise _Refusal(request_id, "bad_request", message)
    try:
        return request_id, request.cmd, args_model.model_validate(request.args)
    except ValidationError as exc:
        raise _Refusal(request_id, "bad_request", f"args: {_describe(exc)}") from None


class ControlServer:
    """Serve the control protocol (docs/protocol.md) on a bound ROUTER, on the loop thread."""

    def __init__(self, ops: Operations, sock: zmq.Socket[bytes]) -> None:
        self.socket = sock
        #: Replies not sent because the client had CONTROL_SNDHWM replies unread.
        self.replies_dropped = 0
        self.ops = ops

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
        try:
            request_id, cmd, args = _decode(raw)
        except _Refusal as refusal:
            send(refusal.request_id, None, refusal.error)
            return

        try:
            outcome = COMMANDS[cmd].run(self.ops, args)
        except ControlError as exc:
            send(request_id, None, exc)
            return
        except Exception as exc:
            log.exception("internal error in %s", cmd)
            send(request_id, None, ControlError("internal", f"{type(exc).__name__}: {exc}"))
            return
        if isinstance(outcome, Coroutine):
            spawn(outcome).add_done_callback(
                lambda done: send(request_id, None if done.error() else done.result(), done.error())
            )
        else:
            send(request_id, outcome, None)

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
                reply["error"] = {"code": error.code, "message": _bounded(error.message)}
            try:
                if isinstance(result, RawJSON) and error is None:
                    head = json.dumps(
                        {"v": PROTOCOL_VERSION, "id": request_id, "ok": True}, allow_nan=False
                    )
                    payload = f'{head[:-1]}, "result": {result}}}'.encode()
                else:
                    payload = json.dumps(reply, allow_nan=False).encode()
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
                # ROUTER_MANDATORY: a client that vanished raises EHOSTUNREACH, one that
                # has CONTROL_SNDHWM replies unread raises EAGAIN; neither is waited for
                self.socket.send_multipart([*envelope, payload], zmq.NOBLOCK)
            except zmq.Again:
                self.replies_dropped += 1
                if self.replies_dropped in (1, 10) or self.replies_dropped % 1000 == 0:
                    log.warning(
                        "a control client does not read its replies: %d dropped so far",
                        self.replies_dropped,
                    )
            except zmq.ZMQError as exc:
                log.debug("could not answer a control request: %s", exc)

        return send
