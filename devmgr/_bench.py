"""`devmgr bench`: throughput of devmgr's loop beside libzmq's proxy and pyzmq's queue.

Each run is PUSH -> device (PULL in, PUSH out, PUB monitor) -> PULL, with a SUB
subscribed to everything draining the monitor. The device runs alone in its own process;
a second process holds the three load sockets, each driven by a C loop of
devmgr._loadgen in its own thread, so the generator and the sink are never what is
measured.

Timing: before a run is timed, single messages are sent until one has come out of the
device and one has reached the monitor's SUB (connections up, subscription in place).
Then the sender sends `count` messages as fast as the device takes them, and the rate
is measured at the sink, from the arrival of the first timed message to that of the
last: (count - 1) / (t_last - t_first). Sender start-up and process start-up are
outside the interval; a run that stalls for `_STALL_TIMEOUT` seconds is reported as
failed, and a run is also killed when its overall deadline passes.

Contenders alternate (A B C A B C ...) so that drift in the machine's load hits each
of them alike.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from devmgr._benchproc import _describe, _end, _endpoints, _recv_within, machine_facts

CONTENDERS = ("devmgr", "zmq_proxy", "pyzmq_monitored_queue")
BASELINE = "zmq_proxy"
TIMING_NOTE = (
    "rate measured at the sink, first to last message of the timed batch, after a "
    "warm-up that waits for the device and the monitor subscription to be up"
)

# Seconds without progress after which a sender or a sink gives up (a stuck device).
_STALL_TIMEOUT = 10.0
# Seconds a device process gets to bind its sockets and report ready.
_START_TIMEOUT = 20.0
# Lowest rate (msg/s) a run is allowed before its overall deadline kills it.
_FLOOR_RATE = 20_000


@dataclass
class RunResult:
    """One timed run of one contender at one size."""

    contender: str
    size: int
    rate: float | None = None
    received: int = 0
    monitor_received: int = 0
    send_rate: float | None = None
    cpu_per_msg_ns: float | None = None
    load_cpu_per_msg_ns: float | None = None
    error: str | None = None


@dataclass
class Summary:
    """The runs of one contender at one size, and their statistics."""

    contender: str
    size: int
    rates: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    monitor_fraction: list[float] = field(default_factory=list)
    cpu_per_msg_ns: list[float] = field(default_factory=list)
    load_cpu_per_msg_ns: list[float] = field(default_factory=list)

    def as_dict(self, baseline: Summary | None) -> dict[str, Any]:
        """Return the JSON form: rates, median, min, max and the ratio to the baseline."""
        median = statistics.median(self.rates) if self.rates else None
        ratio = None
        if median is not None and baseline is not None and baseline.rates:
            ratio = median / statistics.median(baseline.rates)
        return {
            "runs": len(self.rates) + len(self.errors),
            "rates": [round(r) for r in self.rates],
            "median": round(median) if median is not None else None,
            "min": round(min(self.rates)) if self.rates else None,
            "max": round(max(self.rates)) if self.rates else None,
            f"ratio_to_{BASELINE}": round(ratio, 3) if ratio is not None else None,
            "monitor_received_fraction": (
                round(statistics.median(self.monitor_fraction), 3)
                if self.monitor_fraction
                else None
            ),
            "device_cpu_ns_per_msg": (
                round(statistics.median(self.cpu_per_msg_ns)) if self.cpu_per_msg_ns else None
            ),
            "load_cpu_ns_per_msg": (
                round(statistics.median(self.load_cpu_per_msg_ns))
                if self.load_cpu_per_msg_ns
                else None
            ),
            "errors": self.errors,
        }


# --- child processes -----------------------------------------------------------------


def _device_main(
    contender: str, endpoints: dict[str, str], conn: Connection, cpus: set[int] | None
) -> None:
    """Run one contender's device loop in this (child) process until it is killed."""
    import zmq

    if cpus:
        os.sched_setaffinity(0, cpus)

    try:
        if contender == "devmgr":
            # looked up at run time: until the core is built a clear error names it
            loop = importlib.import_module("devmgr._core").proxy
        elif contender == "zmq_proxy":
            loop = zmq.proxy
        elif contender == "pyzmq_monitored_queue":
            from zmq.devices import monitored_queue as loop
        else:
            raise ValueError(f"unknown contender {contender!r}")
        # the child makes its own context: it must never touch a parent's
        ctx = zmq.Context()
        sockets = {
            "in": ctx.socket(zmq.PULL),
            "out": ctx.socket(zmq.PUSH),
            "mon": ctx.socket(zmq.PUB),
        }
        bound = {}
        for side, sock in sockets.items():
            sock.linger = 0
            sock.bind(endpoints[side])
            bound[side] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    except BaseException as exc:
        conn.send(("error", _describe(exc)))
        return
    conn.send(("ready", bound))
    try:
        loop(sockets["in"], sockets["out"], sockets["mon"])
        conn.send(("error", "the device loop returned early"))
    except BaseException as exc:
        conn.send(("error", _describe(exc)))
    finally:
        ctx.destroy(linger=0)


def _warm_up(zmq: Any, push: Any, pull: Any, sub: Any, *, size: int, deadline: float) -> None:
    """Send single messages until one passed the device and one reached the monitor."""
    payload = b"w" * size
    sent = received = 0
    seen_monitor = False
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(sub, zmq.POLLIN)
    while not (seen_monitor and received == sent and sent > 0):
        if time.monotonic() > deadline:
            raise TimeoutError("warm-up: no message came through the device or its monitor")
        if received == sent or not seen_monitor:
            push.send(payload)
            sent += 1
        for sock, _ in poller.poll(20):
            if sock is pull:
                while pull.poll(0):
                    pull.recv()
                    received += 1
            else:
                while sub.poll(0):
                    sub.recv_multipart()
                    seen_monitor = True
    # leave no warm-up message on the monitor for the timed drain to count
    while sub.poll(50):
        sub.recv_multipart()


def _own_cpu_seconds() -> float:
    """Return the CPU time (user + system, every thread) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_main(
    endpoints: dict[str, str], count: int, size: int, conn: Connection, cpus: set[int] | None
) -> None:
    """Drive one timed run from this (child) process; send the figures back on `conn`."""
    import zmq

    if cpus:
        os.sched_setaffinity(0, cpus)

    from devmgr import _loadgen

    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        pull = ctx.socket(zmq.PULL)
        sub = ctx.socket(zmq.SUB)
        stop_tx = ctx.socket(zmq.PAIR)
        stop_rx = ctx.socket(zmq.PAIR)
        for sock in (push, pull, sub, stop_tx, stop_rx):
            sock.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoints["mon"])
        pull.connect(endpoints["out"])
        push.connect(endpoints["in"])
        stop_rx.bind("inproc://stop-monitor")
        stop_tx.connect("inproc://stop-monitor")

        _warm_up(zmq, push, pull, sub, size=size, deadline=time.monotonic() + _START_TIMEOUT)

        results: dict[str, Any] = {}
        cpu_before = _own_cpu_seconds()
        sink = threading.Thread(
            target=lambda: results.setdefault("sink", _loadgen.sink(pull, count, _STALL_TIMEOUT))
        )
        monitor = threading.Thread(
            target=lambda: results.setdefault(
                "mon", _loadgen.drain(sub, stop_rx, count, _STALL_TIMEOUT)
            )
        )
        monitor.start()
        sink.start()
        results["send"] = _loadgen.send(push, count, size, _STALL_TIMEOUT)
        sink.join()
        stop_tx.send(b"")
        monitor.join()
        results["cpu_s"] = _own_cpu_seconds() - cpu_before
        conn.send(("done", results))
    except BaseException as exc:
        conn.send(("error", _describe(exc)))
    finally:
        ctx.destroy(linger=0)


# --- the parent: one run, then many -------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system, every thread) a process has used so far."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _pinning(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """Return the CPUs for the device and for the load, or (None, None) to leave them be."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def run_once(
    contender: str,
    *,
    size: int,
    count: int,
    transport: str,
    folder: str,
    run: int,
    pin: bool = False,
) -> RunResult:
    """Time one contender forwarding `count` messages of `size` bytes; never hang."""
    mp = multiprocessing.get_context("spawn")
    result = RunResult(contender, size)
    device_cpus, load_cpus = _pinning(pin)
    device = load = None
    try:
        dev_rx, dev_tx = mp.Pipe(duplex=False)
        device = mp.Process(
            target=_device_main,
            args=(contender, _endpoints(transport, folder, run), dev_tx, device_cpus),
            name=f"bench-{contender}",
            daemon=True,
        )
        device.start()
        dev_tx.close()
        kind, detail = _recv_within(dev_rx, device, _START_TIMEOUT)
        if kind != "ready":
            result.error = f"device: {detail}"
            return result
        cpu_before = _cpu_seconds(device.pid or 0)

        load_rx, load_tx = mp.Pipe(duplex=False)
        load = mp.Process(
            target=_load_main,
            args=(detail, count, size, load_tx, load_cpus),
            name="bench-load",
            daemon=True,
        )
        load.start()
        load_tx.close()
        timeout = _START_TIMEOUT + 2 * _STALL_TIMEOUT + count / _FLOOR_RATE
        ready = multiprocessing.connection.wait([load_rx, dev_rx, device.sentinel], timeout)
        if load_rx not in ready:
            if ready:
                result.error = f"device: {_recv_within(dev_rx, device, 0)[1]}"
            else:
                result.error = f"timed out after {timeout:.0f} s (device stuck?)"
            return result
        kind, detail = _recv_within(load_rx, load, 0)
        if kind != "done":
            result.error = f"load: {detail}"
            return result
        result.cpu_per_msg_ns = (_cpu_seconds(device.pid or 0) - cpu_before) / count * 1e9
        result.load_cpu_per_msg_ns = detail["cpu_s"] / count * 1e9
        received, _, first, last = detail["sink"]
        sent, send_first, send_last = detail["send"]
        result.received = received
        result.monitor_received = detail["mon"][0]
        if send_last > send_first:
            result.send_rate = sent / ((send_last - send_first) / 1e9)
        if received < count:
            result.error = f"stalled: {received} of {count} messages reached the sink"
        elif last > first:
            result.rate = (received - 1) / ((last - first) / 1e9)
        return result
    finally:
        _end(load)
        _end(device)


def run_bench(
    sizes: Sequence[int],
    *,
    count: int,
    transport: str,
    repeat: int,
    contenders: Sequence[str],
    pin: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Run every contender `repeat` times per size, alternating; return the JSON report.

    With `pin`, each device runs on the first CPU and the load on the others, which
    steadies the figures on a small machine (and makes each device pay for its own
    I/O thread on its one CPU).
    """
    summaries = {(c, s): Summary(c, s) for s in sizes for c in contenders}
    run = 0
    with tempfile.TemporaryDirectory(prefix="dmb-", dir="/tmp") as folder:
        for size in sizes:
            for rep in range(repeat):
                for contender in contenders:
                    run += 1
                    res = run_once(
                        contender,
                        size=size,
                        count=count,
                        transport=transport,
                        folder=folder,
                        run=run,
                        pin=pin,
                    )
                    summary = summaries[(contender, size)]
                    if res.rate is not None:
                        summary.rates.append(res.rate)
                        summary.monitor_fraction.append(res.monitor_received / count)
                        if res.cpu_per_msg_ns is not None:
                            summary.cpu_per_msg_ns.append(res.cpu_per_msg_ns)
                        if res.load_cpu_per_msg_ns is not None:
                            summary.load_cpu_per_msg_ns.append(res.load_cpu_per_msg_ns)
                    else:
                        summary.errors.append(res.error or "no rate")
                    if progress is not None:
                        shown = f"{res.rate:,.0f} msg/s" if res.rate else f"FAILED: {res.error}"
                        print(
                            f"  {size} B run {rep + 1}/{repeat} {contender}: {shown}",
                            file=progress,
                            flush=True,
                        )

    results = []
    for size in sizes:
        baseline = summaries.get((BASELINE, size))
        results.append(
            {
                "size": size,
                "contenders": {c: summaries[(c, size)].as_dict(baseline) for c in contenders},
            }
        )
    return {
        "setup": {
            "count": count,
            "repeat": repeat,
            "transport": transport,
            "sizes": list(sizes),
            "contenders": list(contenders),
            "pinned": pin and len(os.sched_getaffinity(0)) > 1,
            "topology": "PUSH -> device(PULL in, PUSH out, PUB monitor) -> PULL; SUB on monitor",
            "timing": TIMING_NOTE,
            **machine_facts(),
        },
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """Render the report as a plain-text table per message size."""
    setup = report["setup"]
    lines = [
        f"devmgr bench: {setup['transport']}, {setup['count']:,} messages per run, "
        f"{setup['repeat']} runs per contender (alternating), {setup['cpus']} CPUs"
        + (", device pinned to one CPU and load to the rest" if setup["pinned"] else ""),
        f"timing: {setup['timing']}",
    ]
    lines.append(
        "device CPU/msg: the device process's CPU time (all threads) over the run, per "
        "message; monitor got: share of messages the monitor's SUB received (a PUB drops "
        "at its HWM when the subscriber falls behind)"
    )
    ratio_key = f"ratio_to_{BASELINE}"
    for block in report["results"]:
        lines.append("")
        lines.append(f"{block['size']} B messages")
        lines.append(
            f"  {'contender':<24}{'median msg/s':>14}  {'min-max msg/s':<23}"
            f"{'vs ' + BASELINE:>14}{'device CPU/msg':>16}{'monitor got':>13}"
        )
        for name, row in block["contenders"].items():
            if row["median"] is None:
                lines.append(
                    f"  {name:<24}{'FAILED':>14}  {row['errors'][0] if row['errors'] else ''}"
                )
                continue
            span = f"{row['min']:,}-{row['max']:,}"
            ratio = f"{row[ratio_key]:.2f}x" if row[ratio_key] is not None else "-"
            failed = f"  ({len(row['errors'])} failed)" if row["errors"] else ""
            cpu = row["device_cpu_ns_per_msg"]
            cpu_text = f"{cpu:,} ns" if cpu is not None else "-"
            seen = row["monitor_received_fraction"]
            seen_text = f"{seen:.0%}" if seen is not None else "-"
            lines.append(
                f"  {name:<24}{row['median']:>14,}  {span:<23}{ratio:>14}{cpu_text:>16}"
                f"{seen_text:>13}{failed}"
            )
    return "\n".join(lines)


def _contender_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or not names:
        raise ValueError(
            f"unknown contender(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(CONTENDERS)}"
        )
    return names


def main(args: argparse.Namespace) -> int:
    """Run `devmgr bench`; return 0 when every run produced a rate, 1 otherwise."""
    if getattr(args, "latency", False):
        from devmgr import _latency

        return _latency.main(args, ",".join(CONTENDERS))
    try:
        contenders = _contender_list(args.contenders)
    except ValueError as exc:
        print(f"devmgr bench: {exc}", file=sys.stderr)
        return 2
    if args.count < 2 or args.repeat < 1 or any(s < 0 for s in args.size):
        print("devmgr bench: --count must be >= 2, --repeat >= 1, sizes >= 0", file=sys.stderr)
        return 2
    report = run_bench(
        args.size,
        count=args.count,
        transport=args.transport,
        repeat=args.repeat,
        contenders=contenders,
        # `--pin` is honoured once the CLI defines it (tests/bench/bench_throughput.py has it)
        pin=getattr(args, "pin", False),
        progress=sys.stderr,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    failed = any(
        row["errors"] for block in report["results"] for row in block["contenders"].values()
    )
    return 1 if failed else 0
