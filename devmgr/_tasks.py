"""Typed futures and coroutine tasks on the manager's own event loop (no asyncio).

An operation that takes time (start a device, stop it, ask its loop something) returns a
`Pending[T]`: a result that arrives later, on the loop thread. Operations built from
others are `async def` functions that `await` them in order, and `spawn` drives such a
coroutine: it runs until it awaits something not done yet and resumes, on the same
thread, from the callback that resolves it. So a rolling restart reads as a loop::

    async def rolling_restart(fleet, devices):
        for dev in devices:
            await fleet.restart(dev)

Everything here is loop-thread only, like the supervision state it sequences; the
thread-safe facade (devmgr.Manager) hands a coroutine to the loop and waits on a
concurrent.futures.Future for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Generator, Iterable
from typing import Any, Generic, TypeVar

from devmgr._errors import ControlError

log = logging.getLogger("devmgr")
T = TypeVar("T")

_UNSET: Any = object()


class Pending(Generic[T]):
    """A result (or a ControlError) that arrives later on the loop thread.

    Callbacks run when it is resolved, in the order they were added; one added to a
    resolved Pending runs at once. Only the first resolution counts.
    """

    __slots__ = ("_callbacks", "_error", "_value")

    def __init__(self) -> None:
        self._value: T = _UNSET
        self._error: ControlError | None = None
        self._callbacks: list[Callable[[Pending[T]], None]] = []

    def done(self) -> bool:
        return self._value is not _UNSET or self._error is not None

    def set_result(self, value: T) -> None:
        if not self.done():
            self._value = value
            self._fire()

    def set_error(self, error: ControlError) -> None:
        if not self.done():
            self._error = error
            self._fire()

    def error(self) -> ControlError | None:
        """The error it was resolved with, or None (also while it is not resolved)."""
        return self._error

    def result(self) -> T:
        """Return the value, or raise the ControlError it was resolved with."""
        if self._error is not None:
            raise self._error
        if self._value is _UNSET:
            raise RuntimeError("the result is not there yet")
        return self._value

    def add_done_callback(self, callback: Callable[[Pending[T]], None]) -> None:
        if self.done():
            callback(self)
        else:
            self._callbacks.append(callback)

    def _fire(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def __await__(self) -> Generator[Pending[Any], None, T]:
        if not self.done():
            yield self
        return self.result()


def resolved(value: T) -> Pending[T]:
    """Return a Pending that already has `value`."""
    pending: Pending[T] = Pending()
    pending.set_result(value)
    return pending


def failed(error: ControlError) -> Pending[Any]:
    """Return a Pending that already failed with `error`."""
    pending: Pending[Any] = Pending()
    pending.set_error(error)
    return pending


def spawn(coro: Coroutine[Pending[Any], None, T]) -> Pending[T]:
    """Run `coro` on the loop thread now, up to its first wait; return its outcome.

    A ControlError it raises is its error reply; any other exception is a bug, logged
    and answered `internal`, so that it costs one operation, never the manager.
    """
    task: Pending[T] = Pending()

    def step(_waited: Pending[Any] | None = None) -> None:
        try:
            waited = coro.send(None)
        except StopIteration as stop:
            task.set_result(stop.value)
            return
        except ControlError as exc:
            task.set_error(exc)
            return
        except Exception as exc:
            log.exception("internal error in an operation")
            task.set_error(ControlError("internal", f"{type(exc).__name__}: {exc}"))
            return
        # A Pending yields itself only when not resolved: `step` runs at its resolution.
        waited.add_done_callback(step)

    step()
    return task


def gather(pendings: Iterable[Pending[Any]]) -> Pending[None]:
    """Resolve once every one is; fail with all their errors (the first one's code)."""
    items = list(pendings)
    outcome: Pending[None] = Pending()
    remaining = len(items)
    errors: list[ControlError] = []

    def one(pending: Pending[Any]) -> None:
        nonlocal remaining
        error = pending.error()
        if error is not None:
            errors.append(error)
        remaining -= 1
        if remaining == 0:
            if errors:
                message = "; ".join(e.message for e in errors)
                outcome.set_error(ControlError(errors[0].code, message))
            else:
                outcome.set_result(None)

    if not items:
        outcome.set_result(None)
    for pending in items:
        pending.add_done_callback(one)
    return outcome


def settled(pending: Pending[Any]) -> Pending[None]:
    """Resolve (never fail) once `pending` is resolved either way."""
    outcome: Pending[None] = Pending()
    pending.add_done_callback(lambda _p: outcome.set_result(None))
    return outcome
