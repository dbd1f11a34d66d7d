"""The control protocol and lifecycle events as typed pydantic models (CONTRACT 4, 5).

Requests are parsed through these models; one explicit table, COMMANDS, maps each command
name to the model of its `args`. Replies and events are described here too (and generated
into schemas/); the manager builds them as plain dicts on its hot path and the tests check
them against these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from devmgr._wire import PROTOCOL_VERSION, ErrorCode, ProtocolVersion, Reason, State


class RawJSON(str):
    """A result that is already JSON text; the control server embeds it as it is."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Request(BaseModel):
    """One control request: a single UTF-8 JSON frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: ProtocolVersion
    id: Any = None
    cmd: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("v", mode="before")
    @classmethod
    def _exactly_one(cls, value: Any) -> Any:
        # Literal[1] alone would take true and 1.0 (they equal 1 in Python)
        if type(value) is not int:
            raise ValueError(f"the protocol version must be the integer {PROTOCOL_VERSION}")
        return value


# ---- args of each command ----------------------------------------------------------


class NoArgs(_Strict):
    """A command that takes no arguments."""


class StatusArgs(_Strict):
    names: list[str] | None = None


class NamesArgs(_Strict):
    names: list[str] = Field(min_length=1)


class NameArgs(_Strict):
    name: str


class AddArgs(_Strict):
    spec: dict[str, Any]


COMMANDS: dict[str, type[_Strict]] = {
    "ping": NoArgs,
    "version": NoArgs,
    "status": StatusArgs,
    "start": NamesArgs,
    "stop": NamesArgs,
    "restart": NamesArgs,
    "pause": NameArgs,
    "resume": NameArgs,
    "stats": NameArgs,
    "add": AddArgs,
    "remove": NameArgs,
    "reload": NoArgs,
    "shutdown": NoArgs,
}

# ---- results -------------------------------------------------------------------------


class LastExit(_Strict):
    code: int | None
    signal: int | None
    reason: Reason
    at: float


class Stats(_Strict):
    """The 8 counters of a device loop's STATISTICS reply, by their `stats()` keys.

    Its fields are `_wire.STAT_KEYS` in frame order (tests/test_wire.py pins the two).
    """

    in_msgs_received: int
    in_bytes_received: int
    in_msgs_sent: int
    in_bytes_sent: int
    out_msgs_received: int
    out_bytes_received: int
    out_msgs_sent: int
    out_bytes_sent: int


class SideEndpoints(_Strict):
    bind: list[str]
    connect: list[str]


class Endpoints(_Strict):
    in_: SideEndpoints = Field(alias="in")
    out: SideEndpoints
    mon: SideEndpoints | None


class DeviceStatus(_Strict):
    name: str
    kind: str
    state: State
    pid: int | None
    uptime_s: float | None
    restarts: int
    last_exit: LastExit | None
    cpu_percent: float | None
    rss_bytes: int | None
    num_fds: int | None
    msgs_in: int
    msgs_out: int
    bytes_in: int
    bytes_out: int
    stats: Stats
    endpoints: Endpoints
    autostart: bool
    message: str | None = None


class ManagerStatus(_Strict):
    pid: int
    uptime_s: float
    version: str
    config: str | None
    control: str
    events: str


class StatusResult(_Strict):
    manager: ManagerStatus
    devices: list[DeviceStatus]


class VersionResult(_Strict):
    version: str
    protocol: ProtocolVersion


class ReloadResult(_Strict):
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


# ---- replies -------------------------------------------------------------------------


class ErrorBody(_Strict):
    code: ErrorCode
    message: str


class OkReply(_Strict):
    v: ProtocolVersion
    id: Any = None
    ok: Literal[True]
    result: Any = None


class ErrorReply(_Strict):
    v: ProtocolVersion
    id: Any = None
    ok: Literal[False]
    error: ErrorBody


# ---- events (PUB, two frames: topic, JSON) ------------------------------------------

EventTopic = Literal[
    "manager.started",
    "manager.stopping",
    "device.starting",
    "device.running",
    "device.exited",
    "device.backoff",
    "device.fatal",
    "device.unhealthy",
    "device.stopped",
]


class Event(BaseModel):
    """A lifecycle event; details beyond the common fields depend on the topic."""

    model_config = ConfigDict(extra="allow", frozen=True)

    event: EventTopic
    at: float
    device: str | None = None
    pid: int | None = None
    code: int | None = None
    signal: int | None = None
    reason: str | None = None
    delay: float | None = None


# schema file stem -> model; `python -m devmgr._schema` writes schemas/<stem>.schema.json
SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "request": Request,
    "reply-ok": OkReply,
    "reply-error": ErrorReply,
    "status-result": StatusResult,
    "version-result": VersionResult,
    "reload-result": ReloadResult,
    "stats-result": Stats,
    "event": Event,
    **{f"args-{name}": model for name, model in COMMANDS.items()},
}
