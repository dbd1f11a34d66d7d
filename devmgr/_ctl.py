"""The client subcommands of `devmgr`: send one request, print the answer (docs/cli.md).

Exit statuses: `_wire.EXIT_STATUSES` (docs/cli.md). Nothing here imports pydantic except
`add`, which validates its file locally first; pyzmq is imported when the request is sent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from devmgr._client import Client, connectable, curve_from_env, resolve_endpoint_source
from devmgr._errors import ConfigError, ControlError, ManagerUnreachable
from devmgr._wire import (
    EXIT_ERROR_REPLY,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

_HINT = (
    "hint: a manager started with `devmgr start -c FILE` listens where FILE's [manager] "
    "control says: find it with the same -c FILE (or -e ENDPOINT)"
)


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _client(args: argparse.Namespace) -> tuple[Client, str]:
    endpoint, source = resolve_endpoint_source(args.endpoint, args.config)
    curve = curve_from_env(args.curve_client, args.curve_server)
    return Client(endpoint, timeout=args.timeout, curve=curve), source


def _run(args: argparse.Namespace, body: Callable[[Client], int]) -> int:
    """Run `body` with a client, turning devmgr's errors into the CLI's exit statuses."""
    if args.timeout is not None and args.timeout <= 0:
        _err("--timeout must be positive")
        return EXIT_USAGE
    source = ""
    try:
        client, source = _client(args)
        client.on_progress = lambda text: print(
            f"{args.command}: waiting for {text}", file=sys.stderr, flush=True
        )
        with client:
            return body(client)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ControlError as exc:
        _err(f"{exc.code}: {exc.message}")
        return EXIT_ERROR_REPLY
    except ManagerUnreachable as exc:
        _err(str(exc))
        print(f"  endpoint: {source}", file=sys.stderr)
        if exc.listening is False and not (args.endpoint or args.config):
            print(f"  {_HINT}", file=sys.stderr)
        return EXIT_UNREACHABLE


# ---- status ------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """Format seconds like supervisorctl's uptime: `0:01:02`, `3 days, 4:05:06`."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    if days:
        return f"{days} day{'s' if days != 1 else ''}, {clock}"
    return clock


def format_bytes(count: int | None) -> str:
    """Format a byte count with a binary unit: `512B`, `12.3MiB`."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"  # pragma: no cover - unreachable


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def format_last_exit(last_exit: dict[str, Any] | None, now: float) -> str:
    """Format `last_exit` as `exited 1, 5s ago` or `killed SIGKILL, 2:00:00 ago`."""
    if not last_exit:
        return "-"
    reason = str(last_exit.get("reason", "?"))
    code, signum, at = last_exit.get("code"), last_exit.get("signal"), last_exit.get("at")
    how = (
        f" {_signal_name(signum)}" if signum is not None else f" {code}" if code is not None else ""
    )
    ago = ""
    if isinstance(at, int | float):
        delta = max(0.0, now - at)
        ago = f", {int(delta)}s ago" if delta < 60 else f", {format_duration(delta)} ago"
    return f"{reason}{how}{ago}"


_COLUMNS = ("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "MSGS IN", "MSGS OUT", "CPU", "RSS")


def status_rows(result: dict[str, Any], now: float) -> list[tuple[str, ...]]:
    """The cells of the `status` table's rows, one row per device (`_COLUMNS`, LAST EXIT)."""
    rows: list[tuple[str, ...]] = []
    for dev in result.get("devices", []):
        cpu = dev.get("cpu_percent")
        rows.append(
            (
                str(dev.get("name")),
                str(dev.get("state")),
                "-" if dev.get("pid") is None else str(dev["pid"]),
                format_duration(dev.get("uptime_s")),
                str(dev.get("restarts", 0)),
                str(dev.get("msgs_in", 0)),
                str(dev.get("msgs_out", 0)),
                "-" if cpu is None else f"{cpu:.1f}%",
                format_bytes(dev.get("rss_bytes")),
                format_last_exit(dev.get("last_exit"), now)
                + (f" ({dev['message']})" if dev.get("message") else ""),
            )
        )
    return rows


def render_table(header: tuple[str, ...], rows: list[tuple[str, ...]], numeric: set[int]) -> str:
    """Align `rows` under `header`; the columns in `numeric` right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_status_table(result: dict[str, Any], now: float | None = None) -> str:
    """Render the `status` result as an aligned table, one row per device."""
    now = time.time() if now is None else now
    # numbers right-aligned, as they read best
    return render_table((*_COLUMNS, "LAST EXIT"), status_rows(result, now), {2, 4, 5, 6, 7, 8})


def not_running(result: dict[str, Any], named: bool) -> list[dict[str, Any]]:
    """Return the devices of a `status` result that should run but are not `running`.

    Those are the autostart devices, or every device when the result is for named ones.
    `paused` counts as not running: the process lives but forwards nothing.
    """
    return [
        d
        for d in result.get("devices", [])
        if isinstance(d, dict)
        and (named or d.get("autostart", True))
        and d.get("state") != "running"
    ]


def status_main(args: argparse.Namespace) -> int:
    """`devmgr status [NAME...] [--json]`."""

    def body(client: Client) -> int:
        result = client.status(*args.names)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(format_status_table(result))
        down = not_running(result, named=bool(args.names))
        if down:
            shown = ", ".join(f"{d.get('name')} ({d.get('state')})" for d in down)
            print(f"not running: {shown}", file=sys.stderr)
            return EXIT_NOT_RUNNING
        return EXIT_OK

    return _run(args, body)


# ---- commands on devices -------------------------------------------------------------


def names_main(args: argparse.Namespace) -> int:
    """`devmgr start|stop|restart NAME... | --all`."""
    every = bool(getattr(args, "all", False))
    if every and args.names:
        _err(f"{args.command}: give device names or --all, not both")
        return EXIT_USAGE
    if not every and not args.names:
        _err(
            f"{args.command}: give device names" + ("" if args.command == "start" else " or --all")
        )
        return EXIT_USAGE
    names = ["*"] if every else list(args.names)

    def body(client: Client) -> int:
        method = {"start": client.start, "stop": client.stop, "restart": client.restart}
        if getattr(args, "rolling", False):
            devices = client.restart(*names, rolling=True)
        else:
            devices = method[args.command](*names)
        for dev in devices:
            pid = f" (pid {dev['pid']})" if dev.get("pid") is not None else ""
            print(f"{dev.get('name')}: {dev.get('state')}{pid}")
        return EXIT_OK

    return _run(args, body)


def name_main(args: argparse.Namespace) -> int:
    """`devmgr pause|resume|stats|remove NAME`."""

    def body(client: Client) -> int:
        if args.command == "stats":
            stats = client.stats(args.name)
            if getattr(args, "json", False):
                print(json.dumps(stats, indent=2))
            else:
                width = max(map(len, stats), default=0)
                for key, value in stats.items():
                    print(f"{key.ljust(width)}  {value}")
            return EXIT_OK
        if args.command == "remove":
            client.remove(args.name)
            print(f"{args.name}: removed")
            return EXIT_OK
        method = client.pause if args.command == "pause" else client.resume
        dev = method(args.name)
        print(f"{dev.get('name', args.name)}: {dev.get('state')}")
        return EXIT_OK

    return _run(args, body)


def add_main(args: argparse.Namespace) -> int:
    """`devmgr add FILE`: add and start each `[devices.NAME]` table of FILE."""
    try:
        from devmgr._config import parse_devices_file

        specs = list(parse_devices_file(args.file))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not specs:
        _err(f"{args.file}: no [devices.NAME] table in it")
        return EXIT_USAGE

    def body(client: Client) -> int:
        status = EXIT_OK
        for spec in specs:
            try:
                dev = client.add(spec)
            except ControlError as exc:
                _err(f"{exc.code}: {exc.message}")
                status = EXIT_ERROR_REPLY
                continue
            pid = f" (pid {dev['pid']})" if dev.get("pid") is not None else ""
            print(f"{dev.get('name')}: added, {dev.get('state')}{pid}")
        return status

    return _run(args, body)


def simple_main(args: argparse.Namespace) -> int:
    """`devmgr ping|version|reload|shutdown`."""

    def body(client: Client) -> int:
        if args.command == "ping":
            print(client.ping())
        elif args.command == "version":
            info = client.version()
            print(f"devmgr {info.get('version')} (protocol {info.get('protocol')})")
        elif args.command == "reload":
            # the file the user named: a manager running another one says so and refuses
            named = args.config or os.environ.get("DEVMGR_CONFIG") or None
            diff = client.reload(named)
            print(f"reloaded {diff.get('config')}")
            for key in ("added", "removed", "changed", "unchanged"):
                names = diff.get(key) or []
                print(f"{key}: {', '.join(names) if names else '-'}")
        else:
            client.shutdown()
            print("manager stopped")
        return EXIT_OK

    return _run(args, body)


# ---- subscriptions: tap and events ---------------------------------------------------


@contextmanager
def _subscriber(
    endpoint: str, curve_keys: tuple[bytes, bytes, bytes] | None = None
) -> Iterator[Any]:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if curve_keys is not None:  # a CURVE manager's events socket is CURVE too
        public, secret, server_public = curve_keys
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        sock.connect(endpoint)
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def render_frame(frame: bytes, limit: int | None = 256, empty: str = "''") -> str:
    """Show a frame as text when it is printable UTF-8, else as `0x` and hex.

    An empty frame shows as `empty` (`''` in tap's text lines, `""` in its JSON). Text
    that could be mistaken for either form (it starts with `0x`, or is the two
    characters `''`) shows as hex, so the display form is never ambiguous.
    """
    if not frame:
        return empty
    shown = frame if limit is None else frame[:limit]
    try:
        text = shown.decode()
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable() and not text.startswith("0x") and text != "''":
        body = text
    else:
        body = "0x" + shown.hex()
    if len(shown) < len(frame):
        body += f"...({len(frame)} bytes)"
    return body


def tap_main(args: argparse.Namespace) -> int:
    """`devmgr tap NAME`: print each message passing through a device's monitor socket."""

    def body(client: Client) -> int:
        result = client.status(args.name)
        dev = result["devices"][0]
        mon = (dev.get("endpoints") or {}).get("mon")
        if not mon:
            _err(f"device {args.name!r} ({dev.get('kind')}) has no monitor socket to tap")
            return EXIT_USAGE
        binds = [connectable(e) for e in mon.get("bind", [])]
        if not binds:
            _err(
                f"device {args.name!r}'s monitor socket binds nowhere (it connects to "
                f"{', '.join(mon.get('connect', []))}); tap connects to a bound endpoint"
            )
            return EXIT_USAGE
        return _print_stream(binds[0], args, f"tapping {args.name} at {binds[0]}", _tap_line)

    return _run(args, body)


def _tap_line(frames: list[bytes], as_json: bool) -> str:
    direction, rest = (frames[0], frames[1:]) if frames else (b"", [])
    if as_json:
        # "frames" is the display form (an empty frame is ""); "hex" the exact bytes of
        # each frame, from which the message can be rebuilt byte for byte.
        entry = {
            "at": round(time.time(), 6),
            "direction": direction.decode(errors="replace"),
            "frames": [render_frame(f, None, empty="") for f in rest],
            "hex": [f.hex() for f in rest],
            "sizes": [len(f) for f in rest],
        }
        return json.dumps(entry)
    label = direction.decode(errors="replace") or "-"
    return f"{label:<4} " + " | ".join(render_frame(f) for f in rest)


def _event_line(frames: list[bytes], as_json: bool) -> str:
    payload = frames[-1] if frames else b""
    if as_json:
        return payload.decode(errors="replace")
    try:
        event = json.loads(payload)
    except ValueError:
        return " | ".join(render_frame(f) for f in frames)
    if not isinstance(event, dict):
        return payload.decode(errors="replace")
    at = event.get("at")
    stamp = (
        time.strftime("%H:%M:%S", time.localtime(at)) + f".{int((at % 1) * 1000):03d}"
        if isinstance(at, int | float)
        else "-"
    )
    topic = event.get("event") or (frames[0].decode(errors="replace") if frames else "?")
    parts = [stamp, str(topic)]
    if event.get("device"):
        parts.append(str(event["device"]))
    for key, value in event.items():
        if key in ("event", "at", "device") or value is None:
            continue
        shown = value
        if key == "signal" and isinstance(value, int):
            shown = f"{value}({_signal_name(value)})"
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def _print_stream(
    endpoint: str,
    args: argparse.Namespace,
    banner: str,
    line: Callable[[list[bytes], bool], str],
    curve_keys: tuple[bytes, bytes, bytes] | None = None,
) -> int:
    print(f"{banner} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    printed = 0
    with _subscriber(endpoint, curve_keys) as sock:
        while args.count <= 0 or printed < args.count:
            frames = sock.recv_multipart()
            print(line(frames, args.json), flush=True)
            printed += 1
    return EXIT_OK


def events_main(args: argparse.Namespace) -> int:
    """`devmgr events`: print the manager's lifecycle events as they happen."""

    def body(client: Client) -> int:
        endpoint = connectable(client.status()["manager"]["events"])
        return _print_stream(
            endpoint, args, f"events from {endpoint}", _event_line, client.curve_keys
        )

    return _run(args, body)


# ---- keygen --------------------------------------------------------------------------


def keygen_main(args: argparse.Namespace) -> int:
    """`devmgr keygen DIR [--name N]`: write a CURVE certificate pair."""
    from devmgr._security import create_certificate_pair

    try:
        public, secret = create_certificate_pair(args.directory, args.name)
    except (OSError, ValueError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    print(f"public certificate: {public}")
    print(f"secret certificate: {secret} (keep it private)")
    return EXIT_OK
