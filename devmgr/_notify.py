"""The sd_notify protocol: tell systemd the manager is ready, reloading, stopping, alive.

A service of `Type=notify` gets `NOTIFY_SOCKET` in its environment: a unix datagram
socket (a path, or `@name` for the abstract namespace) that takes newline-separated
`KEY=VALUE` assignments (sd_notify(3)). The watchdog (`WatchdogSec=`) arrives as
`WATCHDOG_USEC`, and `WATCHDOG_PID` when it is meant for one process only. Twenty lines
of socket code do what libsystemd does, so there is no dependency and nothing to link.

Notifying is best effort: systemd not listening (or no systemd at all) must never stop
or slow the manager, so every failure is logged at debug level and swallowed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger("devmgr.notify")

# A blocking send could wedge the manager's loop if systemd stopped reading; a datagram
# to a live systemd is queued at once, so one second only bounds the pathological case.
_SEND_TIMEOUT = 1.0


def _socket_address(value: str) -> str | bytes | None:
    """Return the sendto() address of a NOTIFY_SOCKET value, or None if unsupported."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: a leading NUL byte instead of the '@'.
        return b"\0" + value[1:].encode()
    return None  # vsock: and other transports of newer systemd are not needed here


class SdNotify:
    """Send sd_notify messages to systemd; a no-op when NOTIFY_SOCKET is not set.

    The environment is read once, at construction (pass `environ` to read another
    mapping). Every method returns whether the message was sent and never raises.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.debug("NOTIFY_SOCKET=%r is not a unix socket path: not notifying", raw)
        self._watchdog_usec = _watchdog_usec(env)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # the loop and other threads may notify at once

    @property
    def enabled(self) -> bool:
        """Return True when there is a notification socket to send to."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Return how often to call watchdog() (seconds), or None when there is no watchdog.

        That is half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends, so one late
        tick does not get the service killed.
        """
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def ready(self) -> bool:
        """Tell systemd start-up (or a reload) is complete."""
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """Set the one-line status `systemctl status` shows."""
        # A newline would start another assignment: keep the status on one line.
        return self.send("STATUS=" + " ".join(text.split()))

    def reloading(self) -> bool:
        """Tell systemd a reload has begun; call ready() once it is done."""
        # systemd >= 253 wants the monotonic time with RELOADING=1 to order it against
        # the READY=1 that ends the reload; older versions ignore the extra field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Tell systemd the manager is shutting down (draining its devices)."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """Keep the watchdog from firing (call every watchdog_interval() seconds)."""
        return self.send("WATCHDOG=1")

    def send(self, message: str) -> bool:
        """Send one raw notification (newline-separated KEY=VALUE lines)."""
        if self._address is None:
            return False
        try:
            with self._lock:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(_SEND_TIMEOUT)
                    self._sock = sock
                self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", message.split("\n", 1)[0], exc)
            return False
        return True

    def close(self) -> None:
        """Close the socket (it is opened again on the next send)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """Return WATCHDOG_USEC when it is meant for this process, else None."""
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        if raw:
            log.debug("WATCHDOG_USEC=%r is not a number: no watchdog", raw)
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # the watchdog belongs to another process (e.g. our parent)
        except ValueError:
            return None
    return usec
