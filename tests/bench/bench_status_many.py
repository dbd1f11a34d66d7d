"""`devmgr status` over 20 managers beside one manager's, in the same run (issue 15).

Usage: python tests/bench/bench_status_many.py [--managers 20] [--runs 20] [--json]

Starts `--managers` managers (`devmgr start -c FILE`, one streamer each, every one on
ipc paths in a folder of its own under a temp dir), then runs `devmgr status -e EP1`
and `devmgr status -e EP1 ... -e EPN` alternately, `--runs` times each: wall time from
fork to exit, stdout to /dev/null, bytecode cached in a private PYTHONPYCACHEPREFIX
(filled by one untimed run of each). Reports the medians and their ratio. Goal
(issue 15): <= 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _start(folder: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    folder.mkdir()
    config = folder / "devmgr.toml"
    config.write_text(
        '[manager]\ncontrol = "ipc://ctl"\nevents = "ipc://ev"\nhealth_interval = 1.0\n\n'
        '[devices.d]\nkind = "streamer"\n'
        f'in = {{ type = "PULL", bind = ["ipc://{folder}/in"] }}\n'
        f'out = {{ type = "PUSH", bind = ["ipc://{folder}/out"] }}\n'
    )
    proc = subprocess.Popen(
        [str(BIN / "devmgr"), "start", "-c", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"ipc://{folder}/ctl"


def _wait_running(endpoint: str) -> None:
    from devmgr import Client, ManagerUnreachable

    deadline = time.monotonic() + 120
    with Client(endpoint, timeout=5) as client:
        while time.monotonic() < deadline:
            try:
                if all(d["state"] == "running" for d in client.status()["devices"]):
                    return
            except ManagerUnreachable:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"the manager at {endpoint} did not come up")


def _timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        argv, check=False, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]}... exited {done.returncode}: {done.stderr[-500:]!r}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--managers", type=int, default=20)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dm-many-", dir="/tmp") as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMGR_")}
        env["XDG_RUNTIME_DIR"] = str(root)
        env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
        procs: list[subprocess.Popen[bytes]] = []
        try:
            endpoints = []
            for i in range(args.managers):
                proc, endpoint = _start(root / f"m{i:02d}", env)
                procs.append(proc)
                endpoints.append(endpoint)
            for endpoint in endpoints:
                _wait_running(endpoint)
            one = [str(BIN / "devmgr"), "status", "-e", endpoints[0]]
            many = [str(BIN / "devmgr"), "status", *(a for e in endpoints for a in ("-e", e))]
            _timed(one, env)  # untimed: fills the bytecode cache
            _timed(many, env)
            times: dict[str, list[float]] = {"one": [], "many": []}
            for _ in range(args.runs):
                times["one"].append(_timed(one, env))
                times["many"].append(_timed(many, env))
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    one_ms = statistics.median(times["one"]) * 1e3
    many_ms = statistics.median(times["many"]) * 1e3
    result = {
        "managers": args.managers,
        "runs": args.runs,
        "one_manager_median_ms": round(one_ms, 1),
        "many_managers_median_ms": round(many_ms, 1),
        "ratio": round(many_ms / one_ms, 2),
        "goal_ratio": 2.0,
        "load_1min": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"devmgr status, 1 manager: median {one_ms:.1f} ms; {args.managers} managers: "
            f"median {many_ms:.1f} ms; ratio {result['ratio']}x (goal <= 2x); "
            f"load {result['load_1min']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
