"""The control commands: one explicit, typed table, one entry per command.

Each entry says, in one place, what the command takes (its pydantic `args` model, from
devmgr._protocol), what it does and gives (the paragraph docs/protocol.md is generated
from), whether a client follows it to its end (`long`), and how the manager carries it
out: `run(ops, args)` against the narrow `Operations` interface, which returns the result
at once or a coroutine that gives it later. The control server dispatches through this
table and nothing else; adding a command is an entry here, the operation it calls, and
its test.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel

from devmgr._devlog import BUFFER_LINES
from devmgr._protocol import (
    AddArgs,
    LogsArgs,
    NameArgs,
    NamesArgs,
    NoArgs,
    RawJSON,
    ReloadArgs,
    RestartArgs,
    StatusArgs,
)
from devmgr._tasks import Pending

A = TypeVar("A", bound=BaseModel)
Later = Coroutine[Pending[Any], None, Any]


class Operations(Protocol):
    """What the commands need: the manager's operations (devmgr._operations)."""

    def version_dict(self) -> dict[str, Any]: ...
    def status_json(self, names: list[str] | None = None) -> RawJSON: ...
    def logs_dict(self, name: str, lines: int = 50, after: int | None = None) -> dict[str, Any]: ...
    def start(self, names: list[str]) -> Later: ...
    def stop(self, names: list[str]) -> Later: ...
    def restart(self, names: list[str]) -> Later: ...
    def rolling_restart(self, names: list[str]) -> Later: ...
    def pause(self, name: str) -> Later: ...
    def resume(self, name: str) -> Later: ...
    def stats(self, name: str) -> Later: ...
    def add(self, data: dict[str, Any]) -> Later: ...
    def remove(self, name: str) -> Later: ...
    def reload(self, config: None = None, *, expect_path: str | None = None) -> Later: ...
    def shutdown(self) -> Later: ...


@dataclass(frozen=True)
class Command(Generic[A]):
    """One control command: its args model, its doc, and how the manager runs it."""

    args: type[A]
    does: str  # what it does (docs/protocol.md)
    result: str  # what its result is (docs/protocol.md)
    run: Callable[[Operations, A], Any]  # the result, or a coroutine that gives it
    long: bool = False  # takes as long as devices take: clients follow it to its end


COMMANDS: dict[str, Command[Any]] = {
    "ping": Command[NoArgs](
        NoArgs, "check that the manager answers", '`"pong"`', lambda ops, a: "pong"
    ),
    "version": Command[NoArgs](
        NoArgs,
        "the manager's devmgr version and protocol version",
        "a version result",
        lambda ops, a: ops.version_dict(),
    ),
    "status": Command[StatusArgs](
        StatusArgs,
        "the manager and its devices",
        "a status result",
        lambda ops, a: ops.status_json(a.names),
    ),
    "start": Command[NamesArgs](
        NamesArgs,
        "start stopped, backed-off or fatal devices; answers once each is running or has failed",
        "the devices' status objects",
        lambda ops, a: ops.start(a.names),
        long=True,
    ),
    "stop": Command[NamesArgs](
        NamesArgs,
        "stop devices (drain, SIGTERM, SIGKILL at `stop_timeout`)",
        "the devices' status objects",
        lambda ops, a: ops.stop(a.names),
        long=True,
    ),
    "restart": Command[RestartArgs](
        RestartArgs,
        "stop then start devices; clears `fatal`; `rolling`: one at a time in dependency "
        "order, stopping at the first that does not come back",
        "the devices' status objects",
        lambda ops, a: ops.rolling_restart(a.names) if a.rolling else ops.restart(a.names),
        long=True,
    ),
    "pause": Command[NameArgs](
        NameArgs,
        "stop reading the device's input; answers once the loop has paused",
        "its status object",
        lambda ops, a: ops.pause(a.name),
    ),
    "resume": Command[NameArgs](
        NameArgs,
        "read the device's input again",
        "its status object",
        lambda ops, a: ops.resume(a.name),
    ),
    "stats": Command[NameArgs](
        NameArgs,
        "the device loop's 8 counters, fresh from the loop when it runs",
        "a stats result",
        lambda ops, a: ops.stats(a.name),
    ),
    "add": Command[AddArgs](
        AddArgs,
        "validate, start and keep a new device; nothing is kept if its first start fails",
        "its status object",
        lambda ops, a: ops.add(a.spec),
        long=True,
    ),
    "remove": Command[NameArgs](
        NameArgs,
        "stop a device and forget it",
        "null",
        lambda ops, a: ops.remove(a.name),
        long=True,
    ),
    "reload": Command[ReloadArgs](
        ReloadArgs,
        "re-read the manager's config file and apply the difference device by device",
        "a reload result",
        lambda ops, a: ops.reload(None, expect_path=a.config),
        long=True,
    ),
    "shutdown": Command[NoArgs](
        NoArgs,
        "stop every device, then the manager (which then exits 0)",
        "null",
        lambda ops, a: ops.shutdown(),
        long=True,
    ),
    "logs": Command[LogsArgs](
        LogsArgs,
        "the lines the device's processes wrote to stderr, from the manager's buffer "
        f"(the last {BUFFER_LINES} per device, across restarts)",
        "a logs result",
        lambda ops, a: ops.logs_dict(a.name, a.lines, a.after),
    ),
}

#: schema file stem -> args model, for schemas/ (beside devmgr._protocol.SCHEMA_MODELS)
ARGS_SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    f"args-{name}": command.args for name, command in COMMANDS.items()
}
