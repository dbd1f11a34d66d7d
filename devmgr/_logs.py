"""`devmgr logs NAME [-n N] [-f]`: what a device wrote to stderr, from the manager's buffer.

The manager keeps the last lines of each device (devmgr._devlog); this prints the last N
of them, as `tail -n` and `supervisorctl tail` do, and with -f asks for the lines after
the last one it printed every --interval seconds until Ctrl-C (or SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from devmgr._ctl import _err, _run
from devmgr._devlog import BUFFER_LINES
from devmgr._errors import ManagerUnreachable
from devmgr._wire import EXIT_OK, EXIT_USAGE


def _print(result: dict[str, Any], as_json: bool) -> None:
    if result.get("dropped"):
        print(
            f"devmgr logs: {result['dropped']} lines were written faster than they were "
            "read and are no longer in the manager's buffer",
            file=sys.stderr,
        )
    for entry in result["lines"]:
        print(json.dumps(entry) if as_json else entry["line"])
    sys.stdout.flush()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def logs_main(args: argparse.Namespace) -> int:
    """Print a device's last stderr lines; with -f, follow them."""
    if not 0 <= args.lines <= BUFFER_LINES:
        _err(f"-n must be between 0 and {BUFFER_LINES} (the lines the manager keeps)")
        return EXIT_USAGE
    if args.interval <= 0:
        _err("--interval must be positive")
        return EXIT_USAGE

    def body(client: Any) -> int:
        try:
            result = client.logs(args.name, args.lines)
            _print(result, args.json)
            if not args.follow:
                return EXIT_OK
            for signum in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, _interrupt)
            after = int(result["last_seq"])
            unreachable = False
            full = False
            while True:
                if not full:  # a full answer: more may wait, ask again at once
                    time.sleep(args.interval)  # the follow's pace, not a wait for a condition
                try:
                    result = client.logs(args.name, BUFFER_LINES, after=after)
                except ManagerUnreachable as exc:
                    if not unreachable:  # say it once, then keep asking (as tail -F)
                        print(f"devmgr logs: {exc}; still trying", file=sys.stderr, flush=True)
                    unreachable = True
                    continue
                if unreachable:
                    print("devmgr logs: the manager answers again", file=sys.stderr, flush=True)
                    unreachable = False
                _print(result, args.json)
                after = int(result["last_seq"])
                full = len(result["lines"]) >= BUFFER_LINES
        except KeyboardInterrupt:
            return EXIT_OK
        except BrokenPipeError:  # `devmgr logs NAME | head`: the reader has seen enough
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_OK

    return _run(args, body)
