"""Rerunnable throughput benchmark: `devmgr bench` with its results kept as JSON.

    python tests/bench/bench_throughput.py --count 1000000 --repeat 7
    python tests/bench/bench_throughput.py --transport tcp --output tcp.json

Prints the table of `devmgr bench` and writes the full report (every run's rate, the
medians, min-max, ratios to zmq_proxy, the machine's load and the exact command) to
--output, so a figure in the README can name the file and the command behind it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from devmgr._bench import CONTENDERS, format_table, run_bench


def _git_commit() -> str | None:
    """Return the checkout's commit (with "-dirty" when it has local changes), if any."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit or None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON report; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--count", type=int, default=500_000)
    parser.add_argument("--transport", choices=["ipc", "tcp"], default="ipc")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run each device on the first CPU and the load on the others",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON file to write (default: bench_throughput-<UTC time>.json here)",
    )
    args = parser.parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown := [c for c in contenders if c not in CONTENDERS]:
        parser.error(f"unknown contender(s): {', '.join(unknown)}")

    started = time.time()
    report = run_bench(
        args.size,
        count=args.count,
        transport=args.transport,
        repeat=args.repeat,
        contenders=contenders,
        pin=args.pin,
        progress=sys.stderr,
    )
    report["setup"]["command"] = shlex.join([Path(sys.executable).name, *sys.argv])
    report["setup"]["commit"] = _git_commit()
    report["setup"]["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
    report["setup"]["duration_s"] = round(time.time() - started, 1)

    output = args.output or Path(
        time.strftime("bench_throughput-%Y%m%dT%H%M%SZ.json", time.gmtime(started))
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
