"""Each device's stderr: a pipe per child process, read on the manager's loop, kept per device.

A device writes to stderr only when something is wrong (a Python traceback, a libzmq
assertion, faulthandler's dump of a crash). The manager gives every child a pipe as its
stderr, reads it without blocking whenever the loop sees it readable, and for each line
1. logs it through the `devmgr.device` logger with the device's name (in JSON logs, the
   `device`, `pid`, `stream` and `line` fields), at most `LOG_RATE` lines per second
   per device (the rest are counted in one line that says how many were left out);
2. keeps it in the device's bounded buffer (the last `BUFFER_LINES` lines, each cut at
   `MAX_LINE` bytes), which outlives restarts and is what `devmgr logs` prints.
When a child exits, its pipe is read to the end first, so the last lines it wrote are
in the `device.exited` event and in `status`'s `last_exit` (`stderr`, the last
`EXIT_LINES`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any

log = logging.getLogger("devmgr.device")

#: lines kept per device, across its processes
BUFFER_LINES = 1000
#: bytes of one line kept (and logged); the rest of the line is dropped, marked
MAX_LINE = 4096
#: lines of an exiting process carried by `device.exited` and `last_exit`
EXIT_LINES = 20
#: lines per second per device sent to the manager's log
LOG_RATE = 100
#: bytes read per wake-up: a chatty device cannot hold up the loop
_READ = 65536
_CUT = " [...]"


class DeviceLog:
    """The last lines one device wrote to stderr, numbered from 1 for its lifetime."""

    def __init__(self, name: str, max_lines: int = BUFFER_LINES) -> None:
        self.name = name
        self.lines: deque[tuple[int, float, int, str]] = deque(maxlen=max_lines)  # seq, at, pid
        self.seq = 0  # of the last line taken
        self._window = 0.0  # start of the current rate-limit second
        self._logged = 0  # lines logged in it
        self._suppressed = 0  # lines not logged in it

    def add(self, pid: int, text: str) -> None:
        self.seq += 1
        now = time.time()
        self.lines.append((self.seq, now, pid, text))
        if now - self._window >= 1.0:
            self._flush_suppressed(pid)
            self._window, self._logged = now, 0
        if self._logged < LOG_RATE:
            self._logged += 1
            log.warning(
                "%s[%d]: %s",
                self.name,
                pid,
                text,
                extra={
                    "event": {"device": self.name, "pid": pid, "stream": "stderr", "line": text}
                },
            )
        else:
            self._suppressed += 1

    def _flush_suppressed(self, pid: int) -> None:
        if self._suppressed:
            log.warning(
                "%s[%d]: %d more stderr lines not logged (see `devmgr logs %s`)",
                self.name,
                pid,
                self._suppressed,
                self.name,
                extra={"event": {"device": self.name, "pid": pid, "stream": "stderr"}},
            )
            self._suppressed = 0

    def of_pid(self, pid: int, count: int) -> list[str]:
        """The last `count` lines process `pid` wrote."""
        out: list[str] = []
        for _seq, _at, line_pid, text in reversed(self.lines):
            if len(out) >= count:
                break
            if line_pid == pid:
                out.append(text)
        out.reverse()
        return out

    def tail(self, count: int, after: int | None = None) -> dict[str, Any]:
        """The `logs` result: the last `count` lines, or those after seq `after` (follow).

        `dropped` counts the lines after `after` that the buffer no longer holds.
        """
        if after is not None and after > self.seq:
            after = 0  # a cursor from before this buffer (another manager): from the start
        if after is None:
            chosen = list(self.lines)[-count:] if count > 0 else []
            dropped = 0
        else:
            newer = [entry for entry in self.lines if entry[0] > after]
            first = newer[0][0] if newer else self.seq + 1
            dropped = max(0, first - after - 1) if after < self.seq else 0
            chosen = newer[:count] if count > 0 else []
        return {
            "device": self.name,
            "lines": [
                {"seq": seq, "at": round(at, 6), "pid": pid, "line": text}
                for seq, at, pid, text in chosen
            ],
            "last_seq": chosen[-1][0] if chosen else (self.seq if after is None else after),
            "dropped": dropped,
        }

    def close(self, pid: int) -> None:
        """The process ended: say how many lines were left out of the log, if any."""
        self._flush_suppressed(pid)


class StderrPipe:
    """The read end of one child's stderr pipe, turned into lines of a DeviceLog."""

    def __init__(self, fd: int, pid: int, sink: DeviceLog) -> None:
        self.fd: int | None = fd
        self.pid = pid
        self.sink = sink
        self._partial = b""

    def read(self) -> bool:
        """Read what is there, once; return False at EOF (then take it off the loop, close)."""
        if self.fd is None:
            return False
        try:
            data = os.read(self.fd, _READ)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        self._take(data)
        return True

    def drain(self, limit: int = 16 * _READ) -> None:
        """Read what was written so far (at most `limit` bytes), then close.

        Once the child has exited all it wrote is in the pipe: this takes its last words.
        """
        read = 0
        while self.fd is not None and read < limit:
            try:
                data = os.read(self.fd, _READ)
            except BlockingIOError:
                break
            except OSError:
                break
            if not data:
                break
            read += len(data)
            self._take(data)
        self.close()

    def _take(self, data: bytes) -> None:
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            self._line(raw)
        if len(self._partial) > MAX_LINE:  # a line without an end: cut it here
            self._line(self._partial)
            self._partial = b""

    def _line(self, raw: bytes) -> None:
        raw = raw.rstrip(b"\r")
        text = raw[:MAX_LINE].decode(errors="replace")
        if len(raw) > MAX_LINE:
            text += _CUT
        self.sink.add(self.pid, text)

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.sink.close(self.pid)


def new_pipe() -> tuple[int, int]:
    """Return (read end, non-blocking; write end for the child), both close-on-exec."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(r, False)
    return r, w
