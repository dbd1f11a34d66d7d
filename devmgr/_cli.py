"""The `devmgr` command: argument parsing and dispatch only.

argparse (stdlib) rather than click or typer: `devmgr status` must start fast, and the
parser is a few milliseconds to import. Each subcommand's work lives in the module that
owns it and is imported only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from devmgr._wire import EXIT_OK, EXIT_USAGE

# subcommand -> "module:function"; the function takes the parsed args and returns an int.
_HANDLERS: dict[str, str] = {
    "start": "devmgr._run:start_main",
    "validate": "devmgr._config:validate_main",
    "bench": "devmgr._bench:main",
    "keygen": "devmgr._ctl:keygen_main",
    "status": "devmgr._fleetview:status_main",
    "restart": "devmgr._ctl:names_main",
    "stop": "devmgr._ctl:names_main",
    "pause": "devmgr._ctl:name_main",
    "resume": "devmgr._ctl:name_main",
    "stats": "devmgr._ctl:name_main",
    "add": "devmgr._ctl:add_main",
    "remove": "devmgr._ctl:name_main",
    "reload": "devmgr._ctl:simple_main",
    "shutdown": "devmgr._ctl:simple_main",
    "ping": "devmgr._ctl:simple_main",
    "version": "devmgr._ctl:simple_main",
    "logs": "devmgr._logs:logs_main",
    "tap": "devmgr._ctl:tap_main",
    "events": "devmgr._ctl:events_main",
    "top": "devmgr._top:top_main",
}


def _config_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (else $DEVMGR_CONFIG, else ./devmgr.toml, else the embedded default)",
    )


def _client_opts(p: argparse.ArgumentParser, several: bool = False) -> None:
    _config_opt(p)
    if several:
        p.add_argument(
            "-e",
            "--endpoint",
            action="append",
            help="manager control endpoint; give it again (or EP1,EP2 here or in "
            "$DEVMGR_ENDPOINT) for one table over several managers, asked at once "
            "(else that of -c's config, else $DEVMGR_ENDPOINT, else that of the config "
            "found as for `start`)",
        )
    else:
        p.add_argument(
            "-e",
            "--endpoint",
            help="manager control endpoint (else that of -c's config, else $DEVMGR_ENDPOINT, "
            "else that of the config found as for `start`)",
        )
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds to wait for the reply; for start, stop, restart, reload, shutdown, add "
        "and remove: for a sign of life while the operation runs, however long it takes",
    )
    p.add_argument("--curve-client", metavar="CERT", help="client secret certificate file")
    p.add_argument("--curve-server", metavar="CERT", help="manager public certificate file")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help with each option's default shown, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
            or "%(default)" in text
            or "(default" in text
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _distance(a: str, b: str) -> int:
    """Edit distance counting a swap of two neighbours as one edit (`stauts` -> `status`)."""
    rows = [list(range(len(b) + 1))]
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            cost = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, rows[-2][j - 2] + 1)
            row.append(cost)
        rows.append(row)
    return rows[-1][-1]


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """Return "; did you mean 'x'?" for the closest candidates (ties: all, up to three)."""
    bare = word.lstrip("-")
    scored = [(_distance(bare, c.lstrip("-")), c) for c in dict.fromkeys(candidates)]
    scored = [(d, c) for d, c in scored if d <= max(1, min(2, len(bare) // 3))]
    if not scored:
        return ""
    best = min(d for d, _ in scored)
    close = [c for d, c in scored if d == best][:3]
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the closest command, choice or option."""

    #: The subcommand being parsed (set by main), to suggest from its options.
    command: str | None = None

    def error(self, message: str) -> Any:
        import re

        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice is not None:
            message += _did_you_mean(choice[1], re.findall(r"'([^']*)'", choice[2]))
        elif message.startswith("unrecognized arguments: "):
            options = self._known_options()
            unknown = [w for w in message.split(": ", 1)[1].split() if w.startswith("-")]
            for word in unknown:
                hint = _did_you_mean(word.split("=", 1)[0], options)
                if hint and len(unknown) > 1:
                    hint = f"; {word}: {hint[2:]}"
                message += hint
        super().error(message)

    def _known_options(self) -> list[str]:
        parsers: list[argparse.ArgumentParser] = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and self.command in action.choices:
                parsers.append(action.choices[self.command])
        return [o for p in parsers for a in p._actions for o in a.option_strings]


class _Skipped:
    """Stands in for the subparsers a run does not need (see build_parser's `only`)."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        pass


class _OnlySubparsers:
    def __init__(self, sub: Any, only: str | None) -> None:
        self._sub = sub
        self._only = only

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self._only is None or name == self._only:
            # Every subcommand's --help has a description (its one-line help unless it
            # brings a longer one) and shows the defaults.
            help_text = str(kwargs.get("help") or "")
            kwargs.setdefault("description", help_text[:1].upper() + help_text[1:] + ".")
            kwargs.setdefault("formatter_class", _HelpFormatter)
            return self._sub.add_parser(name, **kwargs)
        return _Skipped()


def _names_opts(p: argparse.ArgumentParser, *, rolling: bool) -> None:
    """Add NAME... and --all (and restart's --rolling)."""
    p.add_argument("names", nargs="*", metavar="NAME", help="the devices (or --all)")
    p.add_argument("--all", action="store_true", help="every device")
    if rolling:
        p.add_argument(
            "--rolling",
            action="store_true",
            help="one at a time in dependency order, each once the previous runs again",
        )


def _bench_opts(p: argparse.ArgumentParser) -> None:
    """Add the options of `devmgr bench` (throughput, and round trips with --latency)."""
    p.add_argument("--size", type=int, nargs="+", default=[64, 1024], help="message sizes in bytes")
    p.add_argument("--count", type=int, default=500_000, help="messages per run")
    p.add_argument(
        "--transport", choices=["ipc", "tcp"], default="ipc", help="between load and device"
    )
    p.add_argument("--repeat", type=int, default=5, help="runs per contender (alternating)")
    p.add_argument(
        "--contenders",
        default="devmgr,zmq_proxy,pyzmq_monitored_queue",
        help="comma-separated list of contenders",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--pin", action="store_true", help="pin the device to one CPU and the load to another"
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="measure round-trip latency instead (one paced request in flight, ROUTER/DEALER "
        "device, echo worker; uses the first --size)",
    )
    p.add_argument("--requests", type=int, default=5000, help="with --latency: requests per run")
    p.add_argument("--rate", type=float, default=2000.0, help="with --latency: requests per second")
    p.add_argument(
        "--opposite-stream",
        type=int,
        default=200_000,
        metavar="MSGS_PER_S",
        help="with --latency: also run each contender with a stream of this many msg/s the "
        "other way, in bursts of 1000 (0: off)",
    )


def _logs_opts(p: argparse.ArgumentParser) -> None:
    """Add the arguments of `devmgr logs`."""
    _client_opts(p)
    p.add_argument("name", metavar="NAME", help="the device")
    p.add_argument(
        "-n", "--lines", type=int, default=50, metavar="N", help="the last N lines (default 50)"
    )
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="then print new lines as they come, until Ctrl-C",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="with -f: seconds between two requests for new lines (default 0.25)",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object per line: seq, at, pid, line"
    )


def _start_opts(p: argparse.ArgumentParser) -> None:
    """Add the options of `devmgr start` (the manager, or client mode with names)."""
    _client_opts(p)
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="devices to start on the running manager; none: run the manager itself",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the manager's log level",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text lines, or one JSON object per line (for log collectors)",
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Return the parser for every devmgr subcommand (docs/cli.md), or just for `only`.

    Building all eighteen subparsers costs ~8 ms, a tenth of `devmgr status`; a run that
    names its subcommand only needs that one (help and errors still get the full tree).
    """
    from devmgr._wire import EXIT_STATUSES

    epilog = "exit statuses:\n" + "\n".join(f"  {c}  {m}" for c, m in EXIT_STATUSES.items())
    parser = _Parser(
        prog="devmgr",
        description="Supervise ZeroMQ devices (queues, forwarders, streamers). "
        "`devmgr COMMAND --help` describes each command and its options.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print devmgr's version")
    sub: Any = _OnlySubparsers(parser.add_subparsers(dest="command", metavar="COMMAND"), only)

    p = sub.add_parser(
        "start",
        help="run the manager in the foreground, or start stopped devices on a running one",
    )
    _start_opts(p)

    p = sub.add_parser(
        "status",
        help="table (or JSON) of the devices",
        description="Table (or JSON) of the devices. Exits 0 when every autostart device "
        "(with NAMEs: every named device) is running, 4 when one is not (stopped, starting, "
        "paused, backoff, fatal...), as `systemctl is-active` tells a script; 1, 2 and 3 as "
        "every command. With several managers (-e EP1 -e EP2...), one table with a MANAGER "
        "column, a row for each manager that does not answer; 3 only when none answers.",
    )
    _client_opts(p, several=True)
    p.add_argument("names", nargs="*", metavar="NAME", help="only these devices (default: all)")
    p.add_argument("--json", action="store_true", help="print the status result as JSON")

    for name, what in (("restart", "restart devices"), ("stop", "stop devices")):
        p = sub.add_parser(name, help=what)
        _client_opts(p)
        _names_opts(p, rolling=name == "restart")

    for name, what in (
        ("pause", "stop reading a device's input"),
        ("resume", "resume a paused device"),
        ("stats", "a device's message and byte counters"),
        ("remove", "stop a device and forget it"),
    ):
        p = sub.add_parser(name, help=what)
        _client_opts(p)
        p.add_argument("name", metavar="NAME", help="the device")
        if name == "stats":
            p.add_argument("--json", action="store_true", help="print the counters as JSON")

    p = sub.add_parser("add", help="add the devices of FILE ([devices.NAME] tables)")
    _client_opts(p)
    p.add_argument("file", metavar="FILE", help="a TOML file of [devices.NAME] tables")

    for name, what in (
        ("reload", "re-read the manager's config file and apply the difference"),
        ("shutdown", "stop every device, then the manager"),
        ("ping", "check that the manager answers"),
        ("version", "the manager's version and protocol"),
    ):
        p = sub.add_parser(name, help=what)
        _client_opts(p)

    p = sub.add_parser(
        "logs",
        help="print what a device wrote to stderr (the manager keeps its last 1000 lines)",
    )
    _logs_opts(p)

    p = sub.add_parser("tap", help="print what passes through a device's monitor socket")
    _client_opts(p)
    p.add_argument("name", metavar="NAME", help="a device with a monitor socket")
    p.add_argument("--count", type=int, default=0, help="stop after N messages (0: never)")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per message: each frame's display form and its exact bytes "
        "in hex (docs/cli.md)",
    )

    p = sub.add_parser("events", help="print lifecycle events as they happen")
    _client_opts(p)
    p.add_argument("--count", type=int, default=0, help="stop after N events (0: never)")
    p.add_argument("--json", action="store_true", help="print the raw JSON of each event")

    p = sub.add_parser(
        "top",
        help="a live table of the devices: state, rates, CPU, RSS (q or Ctrl-C to quit)",
    )
    _client_opts(p)
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (default 1)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one table, with rates over one interval, and exit (for scripts and pipes)",
    )

    p = sub.add_parser("validate", help="check a config, print the problems")
    _config_opt(p)

    p = sub.add_parser("keygen", help="write a CURVE certificate pair (as zmq.auth does)")
    p.add_argument(
        "directory", metavar="DIR", help="folder for NAME.key and NAME.key_secret (0600)"
    )
    p.add_argument("--name", default="devmgr", help="base name of the certificate files")

    p = sub.add_parser("bench", help="throughput of devmgr's loop beside libzmq's proxy")
    _bench_opts(p)
    _config_opt(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the devmgr command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in _HANDLERS else None)
    if isinstance(parser, _Parser):
        parser.command = command
    args = parser.parse_args(argv)
    if args.version:
        from devmgr._version import __version__

        print(__version__)
        return EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    target = _HANDLERS[args.command]
    module_name, func_name = target.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(handler(args))
    except KeyboardInterrupt:
        return 130
