"""The control protocol and lifecycle events as typed pydantic models.

docs/protocol.md and docs/events.md describe them; their tables are generated from here.

Requests are parsed through these models; the command table (devmgr._commands) names the
model of each command's `args`. Replies and events are described here too (and generated
into schemas/); the manager builds them as plain dicts on its hot path and the tests check
them against these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from devmgr._devlog import BUFFER_LINES, EXIT_LINES, MAX_LINE
from devmgr._wire import MAX_NAMES, PROTOCOL_VERSION, ErrorCode, ProtocolVersion, Reason, State


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
    names: list[str] | None = Field(
        default=None,
        max_length=MAX_NAMES,
        description="devices to report (default: all); an unknown name is an error",
    )


class NamesArgs(_Strict):
    names: list[str] = Field(
        min_length=1, max_length=MAX_NAMES, description='device names; ["*"] means every device'
    )


class RestartArgs(NamesArgs):
    rolling: bool = Field(
        default=False,
        description="one device at a time, in dependency order, the next only once the "
        "previous is running again; stops at the first that does not come back",
    )


class NameArgs(_Strict):
    name: str = Field(description="the device's name")


class AddArgs(_Strict):
    spec: dict[str, Any] = Field(
        description="a device table as JSON (the keys of [devices.NAME]) with its `name`"
    )


class LogsArgs(_Strict):
    name: str = Field(description="the device's name")
    lines: int = Field(
        default=50,
        ge=0,
        le=BUFFER_LINES,
        description="how many lines: the last ones, or with `after` the first ones after it",
    )
    after: int | None = Field(
        default=None,
        ge=0,
        description="only lines numbered above this (the `last_seq` of the previous "
        "answer): how `devmgr logs -f` follows",
    )


class ReloadArgs(_Strict):
    config: str | None = Field(
        default=None,
        description="the file the client means (its -c): a manager that runs another "
        "file refuses with `conflict` instead of re-reading its own",
    )


# ---- results -------------------------------------------------------------------------


class LastExit(_Strict):
    code: int | None = Field(description="the exit status; null when a signal ended it")
    signal: int | None = Field(description="the number of the signal that ended it, or null")
    reason: Reason = Field(description="why it ended")
    at: float = Field(description="when, in unix seconds")
    stderr: list[str] = Field(
        default_factory=list,
        description=f"the last lines (at most {EXIT_LINES}) the process wrote to stderr",
    )


class LogLine(_Strict):
    seq: int = Field(description="the line's number, from 1, for the device's lifetime")
    at: float = Field(description="when the manager read it, in unix seconds")
    pid: int = Field(description="the process that wrote it")
    line: str = Field(description=f"the line, without its end (cut at {MAX_LINE} bytes)")


class LogsResult(_Strict):
    device: str = Field(description="the device's name")
    lines: list[LogLine] = Field(description="oldest first")
    last_seq: int = Field(description="pass it as `after` to get the lines that follow")
    dropped: int = Field(
        description="lines after `after` the buffer no longer holds (written faster than "
        "they were asked for)"
    )


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
    name: str = Field(description="the device's name")
    kind: str = Field(description="monitored_queue, queue, forwarder or streamer")
    state: State = Field(description="its lifecycle state")
    pid: int | None = Field(description="the process id; null when no process runs")
    uptime_s: float | None = Field(
        description="seconds since the process was started; null when no process runs"
    )
    restarts: int = Field(
        description="automatic restarts so far (after a crash, a memory or an unresponsive "
        "verdict); manual ones do not count"
    )
    last_exit: LastExit | None = Field(description="the last process's end; null until one")
    cpu_percent: float | None = Field(
        description="CPU use at the last health sample, in per cent of one core"
    )
    rss_bytes: int | None = Field(description="resident memory at the last health sample")
    num_fds: int | None = Field(description="open file descriptors at the last health sample")
    msgs_in: int = Field(description="messages received on the in-socket (in_msgs_received)")
    msgs_out: int = Field(description="messages sent on the out-socket (out_msgs_sent)")
    bytes_in: int = Field(description="bytes of those messages received on the in-socket")
    bytes_out: int = Field(description="bytes of those messages sent on the out-socket")
    stats: Stats = Field(description="all 8 counters of the loop's STATISTICS reply")
    stats_at: float | None = Field(
        default=None,
        description="when the manager last read those counters from the loop (unix "
        "seconds); null before the first reading of this process. A rate is the change "
        "of a counter over the change of stats_at",
    )
    endpoints: Endpoints = Field(description="the device's sockets as configured")
    autostart: bool = Field(description="whether the manager starts it at start-up")
    message: str | None = Field(
        default=None, description="why the last start failed (the OS error and endpoint)"
    )


class ManagerStatus(_Strict):
    pid: int = Field(description="the manager's process id")
    uptime_s: float = Field(description="seconds since the manager started")
    version: str = Field(description="devmgr's version")
    config: str | None = Field(description="the config file; null for the embedded default")
    control: str = Field(description="the control endpoint")
    events: str = Field(description="the events endpoint")
    replies_dropped: int = Field(
        default=0,
        description="control replies not sent because their client had 100 replies unread",
    )


class StatusResult(_Strict):
    manager: ManagerStatus
    devices: list[DeviceStatus]


class VersionResult(_Strict):
    version: str
    protocol: ProtocolVersion


class ReloadResult(_Strict):
    config: str | None = Field(
        description="the file re-read (null for a config handed over in-process)"
    )
    added: list[str] = Field(description="devices in the file and not running: started")
    removed: list[str] = Field(description="devices running and not in the file: removed")
    changed: list[str] = Field(description="devices whose table changed: restarted")
    unchanged: list[str] = Field(description="devices left alone")


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
    "device.paused",
    "device.resumed",
    "device.added",
    "device.removed",
    "manager.reloaded",
]

# topic -> (when it is published, the fields it carries beyond `event` and `at`);
# docs/events.md is generated from these.
EVENT_DOCS: dict[str, tuple[str, str]] = {
    "manager.started": (
        "the manager is serving; autostart devices are starting",
        "pid, config (null: the embedded default), control, events",
    ),
    "manager.stopping": ("the manager begins its shutdown", ""),
    "device.starting": ("a device process was started", "device, pid"),
    "device.running": ("the device bound its sockets and its loop answered", "device, pid"),
    "device.exited": (
        "the device process ended",
        "device, pid, code, signal, reason, stderr (its last lines)",
    ),
    "device.backoff": ("an automatic restart waits for its backoff delay", "device, delay"),
    "device.fatal": (
        "too many restarts within the window: the manager gives up on the device",
        "device, reason (that of the last exit)",
    ),
    "device.unhealthy": (
        "a health verdict: the manager kills the device and restarts it",
        "device, pid, reason (memory or unresponsive)",
    ),
    "device.stopped": ("the device is stopped and stays so", "device"),
    "device.paused": (
        "`pause` took effect (a second one changes nothing, says nothing)",
        "device, pid",
    ),
    "device.resumed": ("`resume` took effect", "device, pid"),
    "device.added": (
        "a device joined the set: after `add` once it runs, after `reload` before it starts",
        "device, kind, by (add or reload), pid (after add)",
    ),
    "device.removed": ("a device left the set, once stopped", "device, by (remove or reload)"),
    "manager.reloaded": (
        "a reload was applied (even when a device of the new set failed to start)",
        "config (the file re-read), added, removed, changed, error",
    ),
}


class Event(BaseModel):
    """A lifecycle event; details beyond the common fields depend on the topic."""

    model_config = ConfigDict(extra="allow", frozen=True)

    event: EventTopic = Field(description="the topic, repeated")
    at: float = Field(description="when, in unix seconds")
    device: str | None = Field(default=None, description="the device's name (device events)")
    pid: int | None = Field(default=None, description="the process id")
    code: int | None = Field(default=None, description="the exit status (device.exited)")
    signal: int | None = Field(default=None, description="the signal number (device.exited)")
    reason: str | None = Field(default=None, description="an exit reason or health verdict")
    delay: float | None = Field(default=None, description="seconds until the restart")
    kind: str | None = Field(default=None, description="the device's kind (device.added)")
    by: Literal["add", "remove", "reload"] | None = Field(
        default=None, description="the command behind device.added or device.removed"
    )
    config: str | None = Field(
        default=None,
        description="the config file (manager.started: null for the embedded default; "
        "manager.reloaded: the file re-read)",
    )
    control: str | None = Field(default=None, description="the control endpoint")
    events: str | None = Field(default=None, description="the events endpoint")
    added: list[str] | None = Field(default=None, description="devices added (manager.reloaded)")
    removed: list[str] | None = Field(
        default=None, description="devices removed (manager.reloaded)"
    )
    changed: list[str] | None = Field(
        default=None, description="devices changed and restarted (manager.reloaded)"
    )
    error: str | None = Field(
        default=None,
        description="why a device of the reloaded set did not start (manager.reloaded)",
    )
    stderr: list[str] | None = Field(
        default=None,
        description="the last lines the process wrote to stderr (device.exited)",
    )


# schema file stem -> model; `python -m devmgr._schema` writes schemas/<stem>.schema.json
SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "request": Request,
    "reply-ok": OkReply,
    "reply-error": ErrorReply,
    "status-result": StatusResult,
    "version-result": VersionResult,
    "reload-result": ReloadResult,
    "stats-result": Stats,
    "logs-result": LogsResult,
    "event": Event,
}
