"""Rerunnable latency benchmark: `devmgr bench --latency` over ipc and tcp, kept as JSON.

    python tests/bench/bench_latency.py                      # ipc and tcp, 5 runs each
    python tests/bench/bench_latency.py --requests 20000 --repeat 3 --output lat.json

One paced request in flight: DEALER -> device (ROUTER/DEALER) -> DEALER echo worker and
back, for devmgr's loop, zmq_proxy with and without a capture socket, pyzmq's
monitored_queue and no device at all (the floor); each again with a heavy stream the
other way. Prints the tables and writes the whole report (p50/p99/p99.9 per contender,
ratios to zmq_proxy with capture, the machine's load and the exact command) to --output.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from bench_throughput import _git_commit

from devmgr._latency import CONTENDERS, format_table, run_latency


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON report; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["ipc", "tcp"], nargs="+", default=["ipc", "tcp"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--opposite-stream", type=int, default=200_000)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown := [c for c in contenders if c not in CONTENDERS]:
        parser.error(f"unknown contender(s): {', '.join(unknown)}")

    started = time.time()
    report = run_latency(
        transports=args.transport,
        contenders=contenders,
        requests=args.requests,
        size=args.size,
        rate=args.rate,
        repeat=args.repeat,
        opposite_stream=args.opposite_stream,
        progress=sys.stderr,
    )
    report["setup"]["command"] = shlex.join([Path(sys.executable).name, *sys.argv])
    report["setup"]["commit"] = _git_commit()
    report["setup"]["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    report["setup"]["duration_s"] = round(time.time() - started, 1)
    output = args.output or Path(
        time.strftime("bench_latency-%Y%m%dT%H%M%SZ.json", time.gmtime(started))
    )
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"\nJSON report: {output}")
    failed = any(
        row["errors"] for block in report["results"] for row in block["contenders"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
