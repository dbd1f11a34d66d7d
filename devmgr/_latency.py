"""`devmgr bench --latency`: what a device adds to a request's round trip.

One request is in flight at a time, paced: request i leaves at the start of its slot
(1 / rate seconds each), or at once when the previous reply came back late. The path is
DEALER client -> device (ROUTER in, DEALER out) -> DEALER echo worker -> back, over ipc
or tcp, for each contender:

- `no_device`: the client's DEALER talks to the worker's directly: the floor (run
  without the opposite stream only: a DEALER worker would share its replies out among
  the client and the stream's sender).
- `devmgr`: devmgr's loop as a device child runs it (a PUB monitor and an idle control
  socket).
- `zmq_proxy_capture`: libzmq's zmq_proxy with a PUB capture socket (the baseline).
- `zmq_proxy`: zmq_proxy without a capture socket.
- `pyzmq_monitored_queue`: pyzmq's Cython monitored_queue with a PUB monitor.

The client, the worker and the opposite stream are C loops of devmgr._loadgen, without
the GIL, so Python's own latency is in none of the figures. With `opposite_stream` > 0 a
second run per contender adds a heavy stream on the way in (bursts of 1,000 messages,
the loop's drain batch, at that many messages per second), which the worker drops: the
replies then cross a loop that is busy draining the other direction.

Contenders alternate (A B C A B C ...) so that drift in the machine's load hits each of
them alike; percentiles are over every request of every run of a contender.
"""

from __future__ import annotations

import argparse
import array
import importlib
import json
import multiprocessing
import multiprocessing.connection
import sys
import tempfile
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from devmgr._benchproc import _describe, _end, _endpoints, _recv_within, machine_facts

CONTENDERS = ("no_device", "devmgr", "zmq_proxy_capture", "zmq_proxy", "pyzmq_monitored_queue")
BASELINE = "zmq_proxy_capture"
_CAPTURING = {"devmgr", "zmq_proxy_capture", "pyzmq_monitored_queue"}
# the opposite stream's bursts: the loop drains up to this many messages per socket
_BURST = 1000
# the worker drops messages whose last frame starts with this byte (the stream's b"a")
_DROP = 0x61
_START_TIMEOUT = 20.0
_WARM_UP = 200


def _device_main(contender: str, endpoints: dict[str, str], conn: Connection) -> None:
    """Run one contender's ROUTER/DEALER device in this (child) process until killed."""
    import zmq

    try:
        ctx = zmq.Context()
        front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        mon = ctx.socket(zmq.PUB) if contender in _CAPTURING else None
        bound = {}
        for side, sock in (("in", front), ("out", back), ("mon", mon)):
            if sock is not None:
                sock.linger = 0
                sock.bind(endpoints[side])
                bound[side] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        loop: Any
        args: tuple[Any, ...] = (front, back, mon)
        if contender == "devmgr":
            # as in a device child: an (idle) control socket beside the three
            ctrl = ctx.socket(zmq.PAIR)
            ctrl.bind("inproc://control")
            loop = importlib.import_module("devmgr._core").proxy
            args = (front, back, mon, ctrl)
        elif contender == "pyzmq_monitored_queue":
            from zmq.devices import monitored_queue as loop
        elif contender in ("zmq_proxy", "zmq_proxy_capture"):
            loop = zmq.proxy
        else:
            raise ValueError(f"unknown contender {contender!r}")
    except BaseException as exc:
        conn.send(("error", _describe(exc)))
        return
    conn.send(("ready", bound))
    try:
        loop(*args)
        conn.send(("error", "the device loop returned early"))
    except BaseException as exc:
        conn.send(("error", _describe(exc)))


def _worker_main(endpoint: str, bind: bool, conn: Connection) -> None:
    """Echo every request back (dropping the opposite stream) until killed."""
    import zmq

    from devmgr import _loadgen

    try:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if bind:
            sock.bind(endpoint)
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            sock.connect(endpoint)
        stop = ctx.socket(zmq.PAIR)
        stop.bind("inproc://never")
    except BaseException as exc:
        conn.send(("error", _describe(exc)))
        return
    conn.send(("ready", endpoint))
    _loadgen.echo(sock, stop, _DROP, 3600.0)


def _client_main(
    endpoints: dict[str, str],
    conn: Connection,
    *,
    requests: int,
    size: int,
    rate: float,
    opposite_stream: int,
) -> None:
    """Time `requests` paced round trips; send the figures back on `conn`."""
    import zmq

    from devmgr import _loadgen

    ctx = zmq.Context()
    threads: list[threading.Thread] = []
    results: dict[str, Any] = {}
    try:
        client = ctx.socket(zmq.DEALER)
        client.linger = 0
        client.connect(endpoints["in"])
        stop_tx, stop_rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        stop_rx.bind("inproc://stop")
        stop_tx.connect("inproc://stop")
        if "mon" in endpoints:
            sub = ctx.socket(zmq.SUB)
            sub.linger = 0
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(endpoints["mon"])
            threads.append(
                threading.Thread(
                    target=lambda: results.setdefault("mon", _loadgen.drain(sub, stop_rx, 0, 3600))
                )
            )
        # connections up and every process past its first messages before timing starts
        warm = _loadgen.ping(client, _WARM_UP, size, 0, _START_TIMEOUT)
        if len(warm) != _WARM_UP * 8:
            raise TimeoutError("warm-up: no reply came back through the device")
        if opposite_stream > 0:
            streamer = ctx.socket(zmq.DEALER)
            streamer.linger = 0
            streamer.connect(endpoints["in"])
            period_ns = int(_BURST / opposite_stream * 1e9)
            stop2_tx, stop2_rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
            stop2_rx.bind("inproc://stop-stream")
            stop2_tx.connect("inproc://stop-stream")
            threads.append(
                threading.Thread(
                    target=lambda: results.setdefault(
                        "stream", _loadgen.stream(streamer, stop2_rx, _BURST, period_ns, size)
                    )
                )
            )
        for thread in threads:
            thread.start()
        rtts = _loadgen.ping(client, requests, size, int(1e9 / rate), 5.0)
        stop_tx.send(b"")
        if opposite_stream > 0:
            stop2_tx.send(b"")
        for thread in threads:
            thread.join()
        conn.send(("done", {"rtts": rtts, "stream": results.get("stream")}))
    except BaseException as exc:
        conn.send(("error", _describe(exc)))
    finally:
        ctx.destroy(linger=0)


def run_once(
    contender: str,
    *,
    requests: int,
    size: int,
    rate: float,
    opposite_stream: int,
    transport: str,
    folder: str,
    run: int,
) -> tuple[list[int], str | None]:
    """Time one contender's round trips; return (rtts in ns, error or None). Never hang."""
    mp = multiprocessing.get_context("spawn")
    procs: list[Any] = []

    def start(target: Any, *args: Any) -> tuple[str, Any]:
        rx, tx = mp.Pipe(duplex=False)
        proc = mp.Process(target=target, args=(*args, tx), daemon=True)
        proc.start()
        tx.close()
        procs.append(proc)
        return _recv_within(rx, proc, _START_TIMEOUT)

    try:
        wanted = _endpoints(transport, folder, run)
        if contender == "no_device":
            kind, detail = start(_worker_main, wanted["in"], True)
            if kind != "ready":
                return [], f"worker: {detail}"
            endpoints = {"in": detail}
        else:
            kind, endpoints = start(_device_main, contender, wanted)
            if kind != "ready":
                return [], f"device: {endpoints}"
            kind, detail = start(_worker_main, endpoints["out"], False)
            if kind != "ready":
                return [], f"worker: {detail}"
            endpoints.pop("out")
        rx, tx = mp.Pipe(duplex=False)
        client = mp.Process(
            target=_client_main,
            args=(endpoints, tx),
            kwargs={
                "requests": requests,
                "size": size,
                "rate": rate,
                "opposite_stream": opposite_stream,
            },
            daemon=True,
        )
        client.start()
        tx.close()
        procs.append(client)
        kind, detail = _recv_within(rx, client, _START_TIMEOUT + 2 * requests / rate + 10)
        if kind != "done":
            return [], f"client: {detail}"
        rtts = array.array("q")
        rtts.frombytes(detail["rtts"])
        if len(rtts) < requests:
            return list(rtts), f"only {len(rtts)} of {requests} replies came back"
        return list(rtts), None
    finally:
        for proc in reversed(procs):
            _end(proc)


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """Return the nearest-rank percentile of already sorted values."""
    rank = max(1, -(-int(fraction * 1e6) * len(sorted_values) // 1_000_000))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _summary(rtts: list[int], runs: int, errors: list[str]) -> dict[str, Any]:
    values = sorted(rtts)
    row: dict[str, Any] = {"runs": runs, "requests": len(values), "errors": errors}
    for name, fraction in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
        row[f"{name}_us"] = round(percentile(values, fraction) / 1e3, 1) if values else None
    return row


def run_latency(
    *,
    transports: Sequence[str],
    contenders: Sequence[str],
    requests: int,
    size: int,
    rate: float,
    repeat: int,
    opposite_stream: int,
    progress: Any = None,
) -> dict[str, Any]:
    """Run every contender `repeat` times per transport and load, alternating; report."""
    loads = [0, opposite_stream] if opposite_stream > 0 else [0]
    samples: dict[tuple[str, int, str], list[int]] = {}
    errors: dict[tuple[str, int, str], list[str]] = {}
    run = 0
    with tempfile.TemporaryDirectory(prefix="dml-", dir="/tmp") as folder:
        for transport in transports:
            for rep in range(repeat):
                for load in loads:
                    for contender in contenders:
                        if load and contender == "no_device":
                            continue
                        run += 1
                        rtts, error = run_once(
                            contender,
                            requests=requests,
                            size=size,
                            rate=rate,
                            opposite_stream=load,
                            transport=transport,
                            folder=folder,
                            run=run,
                        )
                        key = (transport, load, contender)
                        samples.setdefault(key, []).extend(rtts)
                        if error:
                            errors.setdefault(key, []).append(error)
                        if progress is not None:
                            shown = (
                                f"p50 {percentile(sorted(rtts), 0.5) / 1e3:.1f} us"
                                if rtts
                                else "no replies"
                            )
                            print(
                                f"  {transport} run {rep + 1}/{repeat}"
                                f"{' +stream' if load else ''} {contender}: {shown}"
                                + (f" ({error})" if error else ""),
                                file=progress,
                                flush=True,
                            )

    results = []
    for transport in transports:
        for load in loads:
            rows = {
                c: _summary(
                    samples.get((transport, load, c), []),
                    repeat,
                    errors.get((transport, load, c), []),
                )
                for c in contenders
                if not (load and c == "no_device")
            }
            base = rows.get(BASELINE)
            for row in rows.values():
                for name in ("p50", "p99", "p99.9"):
                    mine, theirs = row[f"{name}_us"], base and base[f"{name}_us"]
                    row[f"{name}_ratio_to_{BASELINE}"] = (
                        round(mine / theirs, 3) if mine and theirs else None
                    )
            results.append({"transport": transport, "opposite_stream": load, "contenders": rows})
    return {
        "setup": {
            "mode": "latency",
            "requests": requests,
            "size": size,
            "rate": rate,
            "repeat": repeat,
            "transports": list(transports),
            "contenders": list(contenders),
            "opposite_stream_msgs_per_s": opposite_stream,
            "opposite_stream_burst": _BURST,
            "topology": "DEALER -> device(ROUTER in, DEALER out[, PUB monitor]) -> DEALER "
            "echo; one request in flight, paced",
            **machine_facts(),
        },
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """Render the latency report as a plain-text table per transport and load."""
    setup = report["setup"]
    lines = [
        f"devmgr bench --latency: {setup['requests']:,} requests per run of "
        f"{setup['size']} B at {setup['rate']:,.0f}/s, one in flight, {setup['repeat']} "
        f"runs per contender (alternating), {setup['cpus']} CPUs",
        f"round-trip times over every request of every run; ratios to {BASELINE}",
    ]
    for block in report["results"]:
        lines.append("")
        stream = block["opposite_stream"]
        lines.append(
            f"{block['transport']}"
            + (
                f", with an opposite stream of {stream:,} msg/s in bursts of {_BURST}"
                if stream
                else ", no other traffic"
            )
        )
        lines.append(
            f"  {'contender':<24}{'p50 us':>9}{'p99 us':>9}{'p99.9 us':>10}"
            f"{'p50 ratio':>11}{'p99 ratio':>11}"
        )
        for name, row in block["contenders"].items():
            if row["p50_us"] is None:
                lines.append(f"  {name:<24}{'FAILED':>9}  {row['errors'][:1]}")
                continue

            def ratio(key: str, row: dict[str, Any] = row) -> str:
                value = row[f"{key}_ratio_to_{BASELINE}"]
                return f"{value:.2f}x" if value is not None else "-"

            failed = f"  ({len(row['errors'])} failed)" if row["errors"] else ""
            lines.append(
                f"  {name:<24}{row['p50_us']:>9.1f}{row['p99_us']:>9.1f}{row['p99.9_us']:>10.1f}"
                f"{ratio('p50'):>11}{ratio('p99'):>11}{failed}"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace, default_contenders: str) -> int:
    """Run `devmgr bench --latency`; 0 when every run got every reply, 1 otherwise."""
    text = args.contenders
    names = (
        list(CONTENDERS)
        if text == default_contenders
        else [n.strip() for n in text.split(",") if n.strip()]
    )
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or not names:
        print(
            f"devmgr bench --latency: unknown contender(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(CONTENDERS)}",
            file=sys.stderr,
        )
        return 2
    if args.requests < 1 or args.rate <= 0 or args.repeat < 1 or args.opposite_stream < 0:
        print(
            "devmgr bench --latency: --requests and --repeat must be >= 1, --rate > 0, "
            "--opposite-stream >= 0",
            file=sys.stderr,
        )
        return 2
    report = run_latency(
        transports=[args.transport],
        contenders=names,
        requests=args.requests,
        size=args.size[0],
        rate=args.rate,
        repeat=args.repeat,
        opposite_stream=args.opposite_stream,
        progress=sys.stderr,
    )
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    failed = any(
        row["errors"] for block in report["results"] for row in block["contenders"].values()
    )
    return 1 if failed else 0
