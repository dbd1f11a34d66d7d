"""`devmgr status` over several managers: `-e EP1 -e EP2 ...` or `$DEVMGR_ENDPOINT=EP1,EP2`.

Every manager is asked at once (a thread each, each with its own Client: the plain-socket
transport where it can, pyzmq for CURVE), so the command takes about as long as the
slowest answer, not the sum. One table with a MANAGER column; a manager that does not
answer is a row that says why. Exit statuses: 3 only when no manager answers; else 1
when none answered with a status (errors only), 4 when a device that should run does not
(as for one manager), 0 otherwise. `--json` prints one entry per manager.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from devmgr._client import Client, connectable, curve_from_env
from devmgr._ctl import _COLUMNS, not_running, render_table, status_rows
from devmgr._ctl import status_main as one_status_main
from devmgr._errors import ConfigError, ControlError, ManagerUnreachable
from devmgr._wire import (
    EXIT_ERROR_REPLY,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)


def status_main(args: argparse.Namespace) -> int:
    """`devmgr status`: over several managers when given several endpoints, else one."""
    several = endpoints_of(args)
    if several is not None:
        return fleet_status_main(args, several)
    if isinstance(args.endpoint, list):  # -e given once
        args.endpoint = args.endpoint[0]
    return one_status_main(args)


def endpoints_of(args: argparse.Namespace) -> list[str] | None:
    """The endpoints `status` is to ask when there are several, else None (the usual path).

    Several `-e`, or (without -e and -c) a comma-separated `$DEVMGR_ENDPOINT`.
    """
    import os

    given: list[str] = list(args.endpoint or [])
    if not given and not args.config:
        env = os.environ.get("DEVMGR_ENDPOINT", "")
        if "," in env:
            given = [e.strip() for e in env.split(",")]
    if len(given) < 2 and not any("," in e for e in given):
        return None
    flat = [part.strip() for e in given for part in e.split(",")]
    return [connectable(e) for e in flat if e]


def _ask(
    endpoint: str,
    names: list[str],
    timeout: float,
    curve: Any,
    out: dict[str, dict[str, Any]],
) -> None:
    entry: dict[str, Any] = {"manager": endpoint}
    try:
        with Client(endpoint, timeout=timeout, curve=curve) as client:
            entry["ok"] = True
            entry["status"] = client.status(*names)
    except ManagerUnreachable as exc:
        entry.update(ok=False, error={"code": "unreachable", "message": str(exc)})
    except ControlError as exc:
        entry.update(ok=False, error={"code": exc.code, "message": exc.message})
    except ConfigError as exc:
        entry.update(ok=False, error={"code": "bad_endpoint", "message": str(exc)})
    except Exception as exc:  # one manager's surprise must not cost the others' rows
        entry.update(ok=False, error={"code": "internal", "message": repr(exc)})
    out[endpoint] = entry


def query_all(
    endpoints: list[str], names: list[str], timeout: float, curve: Any
) -> list[dict[str, Any]]:
    """Ask every manager for its status at once; one entry per endpoint, in their order."""
    import threading

    out: dict[str, dict[str, Any]] = {}
    threads = [
        threading.Thread(target=_ask, args=(e, names, timeout, curve, out), daemon=True)
        for e in dict.fromkeys(endpoints)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [out[e] for e in dict.fromkeys(endpoints)]


def format_fleet_table(entries: list[dict[str, Any]], now: float | None = None) -> str:
    """One table of every manager's devices, with a MANAGER column first."""
    now = time.time() if now is None else now
    rows: list[tuple[str, ...]] = []
    blank = ("-",) * (len(_COLUMNS) - 2)
    for entry in entries:
        manager = str(entry["manager"])
        if entry.get("ok"):
            devices = status_rows(entry["status"], now)
            if not devices:
                rows.append((manager, "-", "no devices", *blank, ""))
            rows.extend((manager, *row) for row in devices)
        else:
            error = entry.get("error") or {}
            message = str(error.get("message", ""))
            if error.get("code") == "unreachable":
                rows.append((manager, "-", "unreachable", *blank, message))
            else:
                rows.append((manager, "-", "error", *blank, f"{error.get('code')}: {message}"))
    header = ("MANAGER", *_COLUMNS, "LAST EXIT")
    return render_table(header, rows, {3, 5, 6, 7, 8, 9})


def fleet_status_main(args: argparse.Namespace, endpoints: list[str]) -> int:
    """`devmgr status -e EP1 -e EP2 ... [NAME...] [--json]`."""
    if args.timeout is not None and args.timeout <= 0:
        print("error: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        curve = curve_from_env(args.curve_client, args.curve_server)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    entries = query_all(endpoints, list(args.names), args.timeout, curve)
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        print(format_fleet_table(entries))
    answered = [e for e in entries if e.get("ok")]
    for entry in entries:
        if not entry.get("ok"):
            error = entry["error"]
            print(f"{entry['manager']}: {error['code']}: {error['message']}", file=sys.stderr)
    if not answered:
        if all(e["error"]["code"] == "unreachable" for e in entries):
            return EXIT_UNREACHABLE
        return EXIT_ERROR_REPLY
    down = [(e["manager"], d) for e in answered for d in not_running(e["status"], bool(args.names))]
    if down:
        shown = ", ".join(f"{d.get('name')} ({d.get('state')}) at {m}" for m, d in down)
        print(f"not running: {shown}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    return EXIT_OK
