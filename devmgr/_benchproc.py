"""Child-process helpers shared by the benchmarks (`devmgr bench` and its --latency).

Both harnesses import these from here, so neither imports the other's module to get them.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import platform
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any


def machine_facts() -> dict[str, Any]:
    """The facts every benchmark report carries about the machine and the libraries."""
    import zmq

    return {
        "cpus": os.cpu_count(),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
    }


def _endpoints(transport: str, folder: str, run: int) -> dict[str, str]:
    """The device's in, out and mon endpoints for one run (tcp: ports the device picks)."""
    if transport == "tcp":
        # the device binds a random port and reports it, so no port is raced for
        return {side: "tcp://127.0.0.1:*" for side in ("in", "out", "mon")}
    return {side: f"ipc://{folder}/{run}-{side}" for side in ("in", "out", "mon")}


def _describe(exc: BaseException) -> str:
    """Return "Type: message" (or just the type when the message is empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _end(proc: BaseProcess | None) -> None:
    """End a child we started, by its PID: SIGTERM, then SIGKILL after a grace period."""
    if proc is None or proc.pid is None:
        return
    if proc.is_alive():
        proc.terminate()
        proc.join(2.0)
    if proc.is_alive():
        proc.kill()
    proc.join(5.0)
    proc.close()


def _recv_within(conn: Connection, proc: BaseProcess, timeout: float) -> tuple[str, Any]:
    """Return the next message a child sends, or ("error", why) when none comes in time."""
    ready = multiprocessing.connection.wait([conn, proc.sentinel], timeout)
    if conn in ready:
        try:
            message: tuple[str, Any] = conn.recv()
        except EOFError:
            return ("error", f"process exited with status {proc.exitcode}")
        return message
    if ready:
        return ("error", f"process exited with status {proc.exitcode}")
    return ("error", f"timed out after {timeout:.0f} s")
