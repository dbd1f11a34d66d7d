"""`devmgr start`: run a manager in the foreground, or start devices on a running one."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from devmgr._errors import ConfigError, DevmgrError
from devmgr._wire import EXIT_OK, EXIT_USAGE


class _TextFormatter(logging.Formatter):
    """One readable line per record; no timestamp when journald adds its own."""

    # on this formatter only, not on every one in the process
    converter = time.gmtime  # type: ignore[assignment]  # typeshed's signature is narrower

    def __init__(self, timestamps: bool) -> None:
        prefix = "%(asctime)sZ " if timestamps else ""
        super().__init__(prefix + "%(levelname)s %(message)s")


class _JsonFormatter(logging.Formatter):
    """One JSON object per record, with the lifecycle event's fields when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            entry.update({k: v for k, v in event.items() if k not in entry})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _stderr_is_journal() -> bool:
    """Return True when stderr is the journal stream systemd gave us (systemd.exec(5)).

    JOURNAL_STREAM leaks into children whose stderr goes elsewhere, so compare it with
    stderr's own device and inode, as systemd advises.
    """
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the devmgr logger for the command line (the library never does)."""
    handler = logging.StreamHandler(sys.stderr)
    under_journald = _stderr_is_journal()
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter(not under_journald))
    root = logging.getLogger("devmgr")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def manager_title(config_path: os.PathLike[str] | str | None) -> str:
    """The manager's process title: `devmgr: manager CONFIG` (or the embedded default)."""
    return f"devmgr: manager {config_path or '(embedded default)'}"


def start_main(args: argparse.Namespace) -> int:
    if args.names:
        from devmgr._ctl import names_main

        return names_main(args)
    from devmgr._config import resolve_config

    try:
        config = resolve_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    setup_logging(args.log_level, args.log_format)
    from devmgr._proctitle import set_process_title

    # Only the command names its process: an application embedding a Manager keeps its own.
    set_process_title(manager_title(config.path))

    import signal

    from devmgr._manager import IGNORED_SIGNALS, STOP_SIGNALS, Manager

    # What run() restores when it returns: ignoring, so a SIGTERM that repeats until we
    # are gone (or a late SIGHUP) cannot turn the exit 0 after the drain into -15 while
    # the interpreter shuts down. run() has its own handlers in place before it starts
    # any child, so no child inherits these.
    for sig in (*STOP_SIGNALS, signal.SIGHUP, *IGNORED_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)
    manager = Manager(config)
    try:
        manager.run()
    except DevmgrError as exc:
        logging.getLogger("devmgr").error("%s", exc)
        return 1
    return EXIT_OK
