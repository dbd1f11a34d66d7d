"""Per-device supervision state machine: states, exit reasons, backoff and restart window.

Pure logic, no I/O: the manager feeds it what it saw (a child spawned, answered PING,
exited, was judged unhealthy) and carries out the `Action` it gets back. Time comes from
injected clocks and jitter from an injectable `random.Random`, so tests drive backoff and
windows without sleeping.

Decisions documented here (the manager relies on them):

- Backoff: the n-th consecutive failure waits ``min(backoff_initial * 2**(n-1), backoff_max)``
  times a jitter factor drawn uniformly from [0.8, 1.0], so a delay is never above
  ``backoff_max`` and never negative.
- A crash after a stable run (ready for at least ``stable_after`` seconds) resets the
  consecutive-failure count and restarts at once: `exited` returns `Spawn` (state STARTING,
  ``restarts`` + 1), never ``Wait(0.0)``. It still counts in the restart window, so a
  device that crashes every few seconds does reach FATAL.
- The window counts automatic restarts by the time they are made; a failure that finds
  ``max_restarts`` restarts in the last ``window`` seconds is FATAL.
- Late or out-of-place events (``ready`` when not starting, ``exited`` with no process, a
  stale ``backoff_elapsed``...) are ignored: the method returns `Idle` (or None) and the
  state is unchanged, because the manager may legitimately see them after a stop. The one
  exception is `spawned` out of place, which raises `SupervisorError`: ignoring it would
  lose track of a live process, and it can only come from a manager bug.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from devmgr._wire import Reason, State

__all__ = [
    "Action",
    "ExitInfo",
    "Idle",
    "Kill",
    "Reason",
    "RestartLike",
    "Spawn",
    "State",
    "Supervisor",
    "SupervisorError",
    "Terminate",
    "Wait",
]

JITTER_LOW = 0.8
"""Lowest jitter factor applied to a backoff delay (the highest is 1.0)."""

POLICIES = frozenset({"always", "on-failure", "never"})

# Beyond this many doublings every sane backoff is at its cap; bounding the exponent keeps
# `2.0 ** n` from overflowing in a device that has failed thousands of times in a row.
_MAX_DOUBLINGS = 64


UNHEALTHY_REASONS = frozenset({Reason.MEMORY, Reason.UNRESPONSIVE})


class SupervisorError(RuntimeError):
    """Raise when the manager reports an event that would desynchronise the state machine."""


@dataclass(frozen=True)
class ExitInfo:
    """Record how a child ended; ``at`` is wall-clock unix seconds."""

    code: int | None
    signal: int | None
    reason: Reason
    at: float

    def as_dict(self) -> dict[str, Any]:
        """Return the ``last_exit`` object of the status JSON."""
        return {"code": self.code, "signal": self.signal, "reason": str(self.reason), "at": self.at}


@dataclass(frozen=True)
class Spawn:
    """Start a child process now, then call `Supervisor.spawned`."""


@dataclass(frozen=True)
class Terminate:
    """Ask the running child to drain and exit; escalation to signals is the manager's."""


@dataclass(frozen=True)
class Kill:
    """SIGKILL the child now (it was judged unhealthy)."""


@dataclass(frozen=True)
class Wait:
    """Call `Supervisor.backoff_elapsed` after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class Idle:
    """Nothing to do."""


Action = Spawn | Terminate | Kill | Wait | Idle


class RestartLike(Protocol):
    """The restart settings a supervisor reads (``devmgr._spec.RestartSpec`` has them)."""

    @property
    def policy(self) -> str: ...  # "always" | "on-failure" | "never"
    @property
    def backoff_initial(self) -> float: ...
    @property
    def backoff_max(self) -> float: ...
    @property
    def max_restarts(self) -> int: ...
    @property
    def window(self) -> float: ...


_LIVE_STATES = frozenset({State.STARTING, State.RUNNING, State.PAUSED})


class Supervisor:
    """Decide what to do with one device's child process as events arrive.

    Args:
        name: the device name (for error messages).
        restart: the restart policy and limits.
        clock: monotonic seconds, for uptime, stability, backoff and the window.
        wall_clock: unix seconds, for ``last_exit.at``.
        rng: the source of backoff jitter (seed it in tests).
        stable_after: a child ready for this many seconds ran stably; its crash is
            restarted at once and resets the backoff.

    Raises:
        ValueError: an unknown restart policy.
    """

    def __init__(
        self,
        name: str,
        restart: RestartLike,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        stable_after: float = 1.0,
    ) -> None:
        if restart.policy not in POLICIES:
            raise ValueError(f"device {name!r}: unknown restart policy {restart.policy!r}")
        self.name = name
        self._restart = restart
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng if rng is not None else random.Random()
        self._stable_after = stable_after

        self._state = State.STOPPED
        self._pid: int | None = None
        self._restarts = 0
        self._last_exit: ExitInfo | None = None
        self._last_error: str | None = None
        self._backoff_delay: float | None = None
        # Consecutive failures since the last stable run or manual start: the backoff exponent.
        self._failures = 0
        # Clock times of the automatic restarts still inside the window.
        self._restart_times: deque[float] = deque()
        # Facts about the current child that decide the reason of its coming exit.
        self._ready_at: float | None = None
        self._start_failure: str | None = None
        self._verdict: Reason | None = None

    # -- read-only state for status ---------------------------------------------------

    @property
    def state(self) -> State:
        """The current lifecycle state."""
        return self._state

    @property
    def pid(self) -> int | None:
        """The current child's pid, None when no process runs."""
        return self._pid

    @property
    def restarts(self) -> int:
        """Automatic restarts made so far (cumulative; manual starts do not count)."""
        return self._restarts

    @property
    def last_exit(self) -> ExitInfo | None:
        """How the previous child ended, None before the first exit."""
        return self._last_exit

    @property
    def last_error(self) -> str | None:
        """The message of the last start failure the child reported, if any."""
        return self._last_error

    @property
    def backoff_delay(self) -> float | None:
        """The delay of the pending backoff (state BACKOFF), else None."""
        return self._backoff_delay

    def uptime(self) -> float | None:
        """Return seconds since the current child became ready (0.0 before), None without one."""
        if self._pid is None:
            return None
        if self._ready_at is None:
            return 0.0
        return max(0.0, self._clock() - self._ready_at)

    # -- inputs ---------------------------------------------------------------------------

    def start(self) -> Action:
        """Handle a manual start: clear FATAL and the window, and spawn unless a child is up."""
        if self._state not in (State.STOPPED, State.FATAL, State.BACKOFF):
            return Idle()
        self._restart_times.clear()
        self._failures = 0
        self._backoff_delay = None
        self._enter_starting()
        return Spawn()

    def spawned(self, pid: int) -> None:
        """Record that the child asked for by `Spawn` exists.

        Raises:
            SupervisorError: no spawn was pending (a manager bug).
        """
        if self._state is not State.STARTING or self._pid is not None:
            raise SupervisorError(
                f"device {self.name!r}: spawned(pid={pid}) in state {self._state}"
                f" with pid {self._pid}; no spawn was pending"
            )
        self._pid = pid

    def spawn_failed(self, message: str) -> Action:
        """Handle a `Spawn` the manager could not carry out (fork failed): a failed start."""
        if self._state is not State.STARTING or self._pid is not None:
            return Idle()
        self._last_error = message
        return self._child_ended(None, None, Reason.START_FAILED)

    def ready(self) -> None:
        """Mark the starting child running (it bound everything and answered PING)."""
        if self._state is State.STARTING and self._pid is not None:
            self._state = State.RUNNING
            self._ready_at = self._clock()

    def start_failed(self, message: str) -> None:
        """Record the child's start-failure report; its coming exit gets START_FAILED."""
        if self._state is State.STARTING and self._pid is not None:
            self._start_failure = message
            self._last_error = message

    def paused(self) -> None:
        """Note that the device loop paused."""
        if self._state is State.RUNNING:
            self._state = State.PAUSED

    def resumed(self) -> None:
        """Note that the device loop resumed."""
        if self._state is State.PAUSED:
            self._state = State.RUNNING

    def unhealthy(self, reason: Reason) -> Action:
        """Handle a health verdict (MEMORY or UNRESPONSIVE): kill the child, remember why.

        A second verdict before the exit, or one during a stop (whose own escalation ends
        the child), is ignored.

        Raises:
            ValueError: ``reason`` is not a health verdict.
        """
        if reason not in UNHEALTHY_REASONS:
            raise ValueError(f"unhealthy() takes MEMORY or UNRESPONSIVE, not {reason!r}")
        if self._pid is None or self._state not in _LIVE_STATES or self._verdict is not None:
            return Idle()
        self._verdict = reason
        return Kill()

    def stop(self) -> Action:
        """Handle a manual stop: drain a live child, cancel a backoff."""
        if self._state in _LIVE_STATES:
            if self._pid is None:
                # Stopped between Spawn and spawned(): there is no child to ask.
                self._state = State.STOPPED
                return Idle()
            self._state = State.STOPPING
            return Terminate()
        if self._state is State.BACKOFF:
            self._state = State.STOPPED
            self._backoff_delay = None
        return Idle()

    def backoff_elapsed(self) -> Action:
        """Make the automatic restart a backoff was waiting for (stale timers are ignored)."""
        if self._state is not State.BACKOFF:
            return Idle()
        self._backoff_delay = None
        return self._restart_now()

    def exited(self, code: int | None, signal: int | None, *, pid: int | None = None) -> Action:
        """Handle the child's exit and decide: restart now, back off, stop, or go FATAL.

        ``pid``, when given, must be the current child's, else the event is stale and
        ignored. A signal death records ``code`` as None.
        """
        if self._pid is None or (pid is not None and pid != self._pid):
            return Idle()
        if signal is not None:
            code = None
        if self._state is State.STOPPING:
            reason = Reason.STOPPED
        elif self._verdict is not None:
            reason = self._verdict
        elif self._start_failure is not None:
            reason = Reason.START_FAILED
        elif signal is not None:
            reason = Reason.KILLED
        else:
            reason = Reason.EXITED
        return self._child_ended(code, signal, reason)

    # -- internals ------------------------------------------------------------------------

    def _enter_starting(self) -> None:
        self._state = State.STARTING
        self._pid = None
        self._ready_at = None
        self._start_failure = None
        self._verdict = None

    def _child_ended(self, code: int | None, signal: int | None, reason: Reason) -> Action:
        now = self._clock()
        ran_for = None if self._ready_at is None else now - self._ready_at
        self._last_exit = ExitInfo(code, signal, reason, self._wall_clock())
        self._pid = None
        self._ready_at = None
        self._start_failure = None
        self._verdict = None

        policy = self._restart.policy
        clean_exit = reason is Reason.EXITED and code == 0 and ran_for is not None
        if reason is Reason.STOPPED or policy == "never" or (policy == "on-failure" and clean_exit):
            self._state = State.STOPPED
            return Idle()

        # A failure. The window decides whether another automatic restart is allowed.
        cutoff = now - self._restart.window
        while self._restart_times and self._restart_times[0] <= cutoff:
            self._restart_times.popleft()
        if len(self._restart_times) >= self._restart.max_restarts:
            self._state = State.FATAL
            return Idle()

        if ran_for is not None and ran_for >= self._stable_after:
            # It ran fine for a while: a one-off crash, not a loop; bring it back at once.
            self._failures = 0
            return self._restart_now()

        self._failures += 1
        self._state = State.BACKOFF
        self._backoff_delay = self._next_delay()
        return Wait(self._backoff_delay)

    def _next_delay(self) -> float:
        exponent = min(self._failures - 1, _MAX_DOUBLINGS)
        base = max(0.0, self._restart.backoff_initial) * 2.0**exponent
        capped = min(base, max(0.0, self._restart.backoff_max))
        # min() guards against float rounding nudging the product above the cap.
        return min(capped, capped * self._rng.uniform(JITTER_LOW, 1.0))

    def _restart_now(self) -> Action:
        self._restarts += 1
        self._restart_times.append(self._clock())
        self._enter_starting()
        return Spawn()

    def __repr__(self) -> str:
        return (
            f"Supervisor({self.name!r}, state={self._state}, pid={self._pid},"
            f" restarts={self._restarts})"
        )
