"""Exceptions raised by devmgr; all derive from DevmgrError.

Kept free of pydantic and zmq so that the client and the CLI can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable


class DevmgrError(Exception):
    """Base class of every error devmgr raises on purpose."""


class Problem:
    """One thing wrong with a config: where it is and what would be right.

    A plain class rather than a dataclass: dataclasses import `inspect`, which costs the
    CLI ~9 ms on every start, and `devmgr status` imports this module.
    """

    __slots__ = ("message", "where")

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Problem):
            return NotImplemented
        return (self.where, self.message) == (other.where, other.message)

    def __hash__(self) -> int:
        return hash((self.where, self.message))

    def __repr__(self) -> str:
        return f"Problem(where={self.where!r}, message={self.message!r})"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ConfigError(DevmgrError):
    """A config (file, device table or spec) is invalid; `problems` lists each place."""

    def __init__(self, problems: Iterable[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ControlError(DevmgrError):
    """The manager answered a control request with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class ManagerUnreachable(DevmgrError):
    """No manager answered: nothing listens at the endpoint, or nothing answered in time.

    `listening` is False when nothing listens there at all (no socket file, a stale one,
    connection refused: said at once, without waiting for the timeout), True when
    something accepted the connection but no answer came in time, None when unknown.
    """

    def __init__(self, message: str, *, listening: bool | None = None) -> None:
        self.listening = listening
        super().__init__(message)


class DeviceStartError(DevmgrError):
    """A device child could not bind, connect or configure a socket."""

    def __init__(self, message: str, *, endpoint: str | None = None, errno: int | None = None):
        self.endpoint = endpoint
        self.errno = errno
        super().__init__(message)
