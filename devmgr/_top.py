"""`devmgr top`: a live table of the devices, refreshed in place until q or Ctrl-C.

Each refresh is one `status` request. Rates come from the loop's own counters (the
STATISTICS a device's loop answers at each health tick) divided by the time between the
two readings (`stats_at`), so a refresh that sees no new reading shows the last rate
instead of a spurious zero. On a terminal the table is redrawn in place on the
alternate screen (as top and htop do) and the terminal is given back as it was; piped,
or with TERM=dumb, each refresh is printed after the last as plain text.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from devmgr._ctl import _err, _run, format_bytes, format_duration
from devmgr._errors import ControlError, ManagerUnreachable
from devmgr._wire import EXIT_OK, EXIT_USAGE

_COLUMNS = (
    "NAME",
    "STATE",
    "PID",
    "UPTIME",
    "RESTARTS",
    "MSG/S IN",
    "MSG/S OUT",
    "B/S IN",
    "B/S OUT",
    "CPU",
    "RSS",
)
_NUMERIC = frozenset(range(2, len(_COLUMNS))) - {3}
# the counters behind the four rate columns, in their order (keys of `status` stats)
_RATE_KEYS = ("in_msgs_received", "out_msgs_sent", "in_bytes_received", "out_bytes_sent")

_ALT_SCREEN_ON, _ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"
_CURSOR_OFF, _CURSOR_ON = "\x1b[?25l", "\x1b[?25h"
_HOME, _CLEAR_EOL, _CLEAR_EOS = "\x1b[H", "\x1b[K", "\x1b[J"


@dataclass
class _Reading:
    pid: int | None
    at: float | None
    counters: tuple[int, ...]
    rates: tuple[float, ...] | None = None


class RateTracker:
    """Per-device rates from successive `status` results."""

    def __init__(self) -> None:
        self._last: dict[str, _Reading] = {}

    def update(self, devices: list[dict[str, Any]]) -> dict[str, tuple[float, ...] | None]:
        """Take one status result's devices; return each device's rates (None: unknown)."""
        out: dict[str, tuple[float, ...] | None] = {}
        seen: dict[str, _Reading] = {}
        for dev in devices:
            name = str(dev.get("name"))
            stats = dev.get("stats") or {}
            now = _Reading(
                pid=dev.get("pid"),
                at=dev.get("stats_at"),
                counters=tuple(int(stats.get(k, 0)) for k in _RATE_KEYS),
            )
            before = self._last.get(name)
            if now.pid is None or now.at is None or before is None or before.pid != now.pid:
                now.rates = None
            elif before.at is None or now.at <= before.at:
                now.rates = before.rates  # no new reading since the last refresh
            else:
                deltas = [n - b for n, b in zip(now.counters, before.counters, strict=True)]
                elapsed = now.at - before.at
                now.rates = None if min(deltas) < 0 else tuple(d / elapsed for d in deltas)
            seen[name] = now
            out[name] = now.rates
        self._last = seen
        return out


def format_rate(value: float | None, unit: str = "") -> str:
    """Format a per-second rate compactly: `0`, `950`, `12.3k`, `4.5M` (unit appended)."""
    if value is None:
        return "-"
    if unit == "B":
        return format_bytes(round(value))
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


def render(
    result: dict[str, Any],
    rates: dict[str, tuple[float, ...] | None],
    interval: float,
    now: float,
    error: str | None = None,
) -> list[str]:
    """Return the lines of one frame: a header, then the table."""
    manager = result.get("manager") or {}
    devices = result.get("devices") or []
    counts: dict[str, int] = {}
    for dev in devices:
        counts[str(dev.get("state"))] = counts.get(str(dev.get("state")), 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in counts.items()) or "none"
    config = manager.get("config") or "(embedded default)"
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    lines = [
        f"devmgr top - {clock}, every {interval:g}s - manager pid {manager.get('pid', '-')}, "
        f"up {format_duration(manager.get('uptime_s'))}, {config}",
        f"devices: {len(devices)} ({summary})" + (f" - {error}" if error else ""),
        "",
    ]
    rows: list[tuple[str, ...]] = [_COLUMNS]
    for dev in devices:
        name = str(dev.get("name"))
        rate = rates.get(name)
        msgs_in, msgs_out, bytes_in, bytes_out = rate if rate is not None else (None,) * 4
        cpu = dev.get("cpu_percent")
        rows.append(
            (
                name,
                str(dev.get("state")),
                "-" if dev.get("pid") is None else str(dev["pid"]),
                format_duration(dev.get("uptime_s")),
                str(dev.get("restarts", 0)),
                format_rate(msgs_in),
                format_rate(msgs_out),
                _per_second(format_rate(bytes_in, "B")),
                _per_second(format_rate(bytes_out, "B")),
                "-" if cpu is None else f"{cpu:.1f}%",
                format_bytes(dev.get("rss_bytes")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in _NUMERIC else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _per_second(text: str) -> str:
    return text if text == "-" else f"{text}/s"


class _Screen:
    """Where frames go: in place on a terminal, one after another elsewhere."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self._tty_attrs: Any = None

    def __enter__(self) -> _Screen:
        if self.live:
            self.out.write(_ALT_SCREEN_ON + _CURSOR_OFF)
            self.out.flush()
            self._cbreak()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._restore()
            self.out.write(_CURSOR_ON + _ALT_SCREEN_OFF)
            self.out.flush()

    def _cbreak(self) -> None:
        """Read single keys (q) without echo; Ctrl-C still raises SIGINT."""
        if not sys.stdin.isatty():
            return
        import termios

        fd = sys.stdin.fileno()
        self._tty_attrs = termios.tcgetattr(fd)
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~(termios.ICANON | termios.ECHO)
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        termios.tcsetattr(fd, termios.TCSANOW, attrs)

    def _restore(self) -> None:
        if self._tty_attrs is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self._tty_attrs)
            self._tty_attrs = None

    def show(self, lines: list[str]) -> None:
        if not self.live:
            self.out.write("\n".join(lines) + "\n\n")
            self.out.flush()
            return
        size = shutil.get_terminal_size()
        shown = [line[: size.columns] for line in lines]
        if len(shown) > size.lines:  # never scroll the frame: say what did not fit
            hidden = len(shown) - size.lines + 1
            shown = [*shown[: size.lines - 1], f"... {hidden} more lines"[: size.columns]]
        self.out.write(_HOME + (_CLEAR_EOL + "\n").join(shown) + _CLEAR_EOL + _CLEAR_EOS)
        self.out.flush()

    def wait(self, seconds: float) -> bool:
        """Wait until the next refresh; return False when the user asked to quit (q)."""
        if self._tty_attrs is None:
            time.sleep(seconds)
            return True
        deadline = time.monotonic() + seconds
        fd = sys.stdin.fileno()
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                key = os.read(fd, 32)
                if not key or key[:1] in (b"q", b"Q"):
                    return False
        return True


def top_main(args: argparse.Namespace) -> int:
    """`devmgr top [--interval S] [--once]`: a live table of the devices."""
    if args.interval <= 0:
        _err("--interval must be positive")
        return EXIT_USAGE
    live = not args.once and sys.stdout.isatty() and os.environ.get("TERM", "") not in ("", "dumb")

    def body(client: Any) -> int:
        tracker = RateTracker()
        # SIGTERM and a terminal's hang-up end top as Ctrl-C does: the terminal is restored.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _interrupt)
        try:
            last = client.status()  # no manager: the usual error and exit status 3
            rates = tracker.update(last["devices"])
            if args.once:
                last, rates = _second_reading(client, tracker, args.interval)
                _Screen(sys.stdout, live=False).show(
                    render(last, rates, args.interval, time.time())
                )
                return EXIT_OK
            with _Screen(sys.stdout, live) as screen:
                error = None
                while True:
                    screen.show(render(last, rates, args.interval, time.time(), error))
                    if not screen.wait(args.interval):
                        return EXIT_OK
                    try:
                        last = client.status()
                        rates = tracker.update(last["devices"])
                        error = None
                    except (ManagerUnreachable, ControlError) as exc:
                        # the last table stays up, marked; top goes on asking
                        error = f"no answer: {exc}"
        except KeyboardInterrupt:
            return EXIT_OK
        except BrokenPipeError:  # `devmgr top | head`: the reader has seen enough
            # point stdout at /dev/null so the interpreter's last flush is quiet too
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_OK

    return _run(args, body)


def _second_reading(
    client: Any, tracker: RateTracker, interval: float
) -> tuple[dict[str, Any], dict[str, tuple[float, ...] | None]]:
    """Take the reading a rate needs after the first: one interval later, or a little more.

    The manager reads a device's counters once per health tick, so a device whose
    counters were not read again within the interval is asked about until they were
    (for up to three intervals more, at least 3 s), rather than shown without a rate.
    """
    time.sleep(interval)
    deadline = time.monotonic() + max(3 * interval, 3.0)
    while True:
        result: dict[str, Any] = client.status()
        rates = tracker.update(result["devices"])
        waiting = [
            d
            for d in result["devices"]
            if d.get("state") in ("running", "paused") and rates.get(d["name"]) is None
        ]
        if not waiting or time.monotonic() >= deadline:
            return result, rates
        time.sleep(min(interval, 0.1))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
