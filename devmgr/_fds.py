"""The manager's file descriptors: raise the soft limit at start, keep a budget for devices.

libzmq treats EMFILE on most of its internal calls (an accept, a new socket's mailbox) as
an assertion, so a manager that runs out of fds aborts, and every device dies with it.
So the manager raises its soft RLIMIT_NOFILE to the hard limit at start (as servers do),
keeps a reserve for its own sockets and clients, and refuses to start one more device
when the device's fds would eat into that reserve: the start fails with a clear message
(an `add` gets an error reply) and the running devices are not touched.
"""

from __future__ import annotations

import logging
import os
import resource
import time

log = logging.getLogger("devmgr")

#: fds the manager holds per device process: its status socket (the sentinel), its
#: pidfd, its stderr pipe, the /proc stat file of the health sampler, the control
#: connection.
PER_DEVICE = 5
#: Kept free for the manager's own use: 64 control and 64 events connections, 16 metrics
#: connections, the transient pipes of a spawn, libzmq's internals. Capped at a quarter
#: of the limit, so a tiny limit still leaves room for a few devices.
RESERVE = 176


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:  # Linux refuses a soft limit above fs.nr_open
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
            return int(soft)
        log.info("raised the open file limit (RLIMIT_NOFILE) from %d to %d", soft, target)
        return int(target)
    return int(soft if soft != resource.RLIM_INFINITY else target)


def open_fds() -> int:
    """Return how many fds this process has open."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir used
    except OSError:  # pragma: no cover - no /proc
        return 0


class FdBudget:
    """Say whether the manager has room for one more device process.

    Counting /proc/self/fd costs ~1 ms per 1,000 fds, too much for each of 1,000 device
    starts: far from the limit the count is reused (for up to a second, plus PER_DEVICE
    per start since), and taken afresh whenever the estimate comes near the limit.
    """

    def __init__(self, limit: int | None = None, reserve: int = RESERVE) -> None:
        self.limit = limit if limit is not None else resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.reserve = min(reserve, self.limit // 4)
        self._counted = 0
        self._counted_at = -1e9
        self._since = 0  # device starts allowed since the count

    def refusal(self) -> str | None:
        """Return why one more device cannot start now, or None when it can (counted)."""
        message = self.check()
        if message is None:
            self._since += 1
        return message

    def check(self) -> str | None:
        """Return why one more device could not start now, or None when it could."""
        now = time.monotonic()
        estimate = self._counted + PER_DEVICE * self._since
        near = estimate + PER_DEVICE + 2 * self.reserve > self.limit
        if near or now - self._counted_at > 1.0:
            self._counted, self._counted_at, self._since = open_fds(), now, 0
            estimate = self._counted
        if estimate + PER_DEVICE + self.reserve <= self.limit:
            return None
        return (
            f"no file descriptors left for another device: {estimate} of the limit of "
            f"{self.limit} are in use and {self.reserve} are kept for the manager's own "
            "sockets and clients; raise the limit (ulimit -n, systemd LimitNOFILE=) or run "
            "fewer devices"
        )
