"""A small single-threaded event loop: zmq sockets, raw fds, timers, cross-thread calls.

The manager runs all its I/O in one thread on this loop, so supervision state needs no
locks. Other threads hand work over with `call_soon_threadsafe`, which wakes the poll
through a pipe (a zmq socket must not be shared between threads).

Raw fds (a device process's exit sentinel, one per device) live in an epoll set whose
one fd is what zmq_poll watches: pyzmq's Poller rebuilds its item array on every call
and poll(2) scans every fd, so with the fds in the Poller each wake-up cost O(devices)
and the 1,000-device manager spent its idle core on it; epoll reports only the ready
ones.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import zmq

log = logging.getLogger("devmgr")
T = TypeVar("T")


class Timer:
    """A cancellable one-shot timer handle."""

    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """Poll sockets and fds, fire timers, run callbacks handed over from other threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._poller = zmq.Poller()
        self._handlers: dict[Any, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._handlers[self._wake_r] = self._drain_wakeups
        self._fd_handlers: dict[int, Callable[[], None]] = {}
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        if self._epoll is not None:
            self._poller.register(self._epoll.fileno(), zmq.POLLIN)
            self._handlers[self._epoll.fileno()] = self._on_fds
        self._running = False
        self._closed = False
        self.thread: threading.Thread | None = None

    # ---- registration (loop thread only) ----

    def add_reader(self, sock_or_fd: Any, callback: Callable[[], None]) -> None:
        if isinstance(sock_or_fd, int) and self._epoll is not None:
            self._epoll.register(sock_or_fd, select.EPOLLIN)
            self._fd_handlers[sock_or_fd] = callback
            return
        self._poller.register(sock_or_fd, zmq.POLLIN)
        self._handlers[sock_or_fd] = callback

    def remove_reader(self, sock_or_fd: Any) -> None:
        if isinstance(sock_or_fd, int) and self._epoll is not None:
            if self._fd_handlers.pop(sock_or_fd, None) is not None:
                try:
                    self._epoll.unregister(sock_or_fd)
                except OSError:
                    pass  # closed already, which took it out of the set
            return
        if self._handlers.pop(sock_or_fd, None) is not None:
            self._poller.unregister(sock_or_fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.clock() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._seq), timer))
        return timer

    # ---- cross-thread ----

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError("the event loop is closed")
        self._calls.append(callback)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is already going to wake up

    def run_sync(
        self,
        fn: Callable[[Callable[[T], None], Callable[[BaseException], None]], None],
        timeout: float | None = None,
    ) -> T:
        """Run `fn(resolve, reject)` on the loop and wait for it to resolve; return the value."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("run_sync called from the event loop thread would deadlock")
        if self.thread is None or not self.thread.is_alive():
            raise RuntimeError("the event loop is not running")
        fut: Future[T] = Future()

        def start() -> None:
            try:
                fn(fut.set_result, fut.set_exception)
            except BaseException as exc:  # hand any failure to the waiting thread
                if not fut.done():
                    fut.set_exception(exc)

        self.call_soon_threadsafe(start)
        return fut.result(timeout)

    def _on_fds(self) -> None:
        assert self._epoll is not None
        for fd, _ in self._epoll.poll(0):
            handler = self._fd_handlers.get(fd)
            if handler is not None:
                self._guard(handler)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # ---- running ----

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        """Run until stop(); exceptions in callbacks are logged and do not end the loop."""
        self._running = True
        poller, handlers, timers = self._poller, self._handlers, self._timers
        while self._running:
            while self._calls:
                self._guard(self._calls.popleft())
            now = self.clock()
            while timers and timers[0][0] <= now:
                _, _, timer = heapq.heappop(timers)
                if not timer.cancelled:
                    self._guard(timer.callback)
            if not self._running:
                break
            if self._calls:
                timeout_ms: int | None = 0
            elif timers:
                timeout_ms = max(0, int((timers[0][0] - self.clock()) * 1000) + 1)
            else:
                timeout_ms = None
            events = poller.poll(timeout_ms)  # pyzmq retries EINTR itself
            for sock, _ in events:
                handler = handlers.get(sock)
                if handler is not None:
                    self._guard(handler)

    def _guard(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.exception("internal error in the manager loop (it goes on)")

    def close(self) -> None:
        self._closed = True
        if self._epoll is not None:
            self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
