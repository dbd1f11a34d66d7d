"""`devmgr status` as a whole command beside `supervisorctl status`, and the Client round trip.

Usage: python tests/bench/bench_status.py [--runs 20] [--roundtrips 2000] [--devices 1,100]
                                          [--json]

Both commands run from bytecode cached in a private PYTHONPYCACHEPREFIX (filled by one
untimed run each), as an installed package would.

Part 1 (whole command): a devmgr manager (`devmgr start -c FILE`, one monitored queue)
and a supervisord (one program, a sleeping Python) run side by side; `devmgr -c FILE
status` and `supervisorctl -c FILE status` run alternately, `--runs` times each, wall
time from fork to exit, stdout to /dev/null. Both console scripts are called by their
real path beside sys.executable (no pyenv shim in between). supervisord is skipped when
it is not installed (pip install supervisor). Goal (issue 5): devmgr <= 0.5x.

Part 2 (round trip): a connected `devmgr.Client` calls `status()` `--roundtrips` times
against a manager with 1 device, then with 100 (streamers on ipc paths). Median and p99.
Goals (issue 5): <= 0.3 ms median with 1 device, <= 2 ms with 100.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def _script(name: str) -> str | None:
    path = BIN / name
    if path.exists():
        return str(path)
    return shutil.which(name)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "min_ms": round(ordered[0] * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
        "p99_ms": round(p99 * 1e3, 3),
        "n": len(ordered),
    }


def _devmgr_config(folder: Path, devices: int) -> Path:
    lines = ['[manager]\ncontrol = "ipc://ctl"\nhealth_interval = 1.0\n']
    for i in range(devices):
        lines.append(
            f'[devices.d{i:03d}]\nkind = "streamer"\n'
            f'in = {{ type = "PULL", bind = ["ipc://{folder}/d{i}-in"] }}\n'
            f'out = {{ type = "PUSH", bind = ["ipc://{folder}/d{i}-out"] }}\n'
        )
    path = folder / f"devmgr-{devices}.toml"
    path.write_text("\n".join(lines))
    return path


class DevmgrManager:
    """A `devmgr start -c FILE` subprocess, stopped with SIGTERM."""

    def __init__(self, folder: Path, devices: int, env: dict[str, str]) -> None:
        self.config = _devmgr_config(folder, devices)
        self.env = env
        self.devices = devices
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DevmgrManager:
        from devmgr import Client

        self.proc = subprocess.Popen(
            [_script("devmgr") or "devmgr", "start", "-c", str(self.config)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"ipc://{self.config.parent}/ctl"
        with Client(endpoint, timeout=60) as client:
            _wait(
                lambda: (
                    sum(d["state"] == "running" for d in client.status()["devices"]) == self.devices
                ),
                120,
                f"{self.devices} devices running",
            )
        self.endpoint = endpoint
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Supervisord:
    """A supervisord in the foreground with one program, on a unix socket."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = folder / "supervisord.conf"
        sock = folder / "supervisor.sock"
        self.config.write_text(
            f"""[unix_http_server]
file={sock}
[supervisord]
nodaemon=true
logfile={folder}/supervisord.log
pidfile={folder}/supervisord.pid
childlogdir={folder}
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{sock}
[program:sleeper]
command={sys.executable} -c "import time; time.sleep(3600)"
autorestart=true
startsecs=0
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Supervisord:
        exe = _script("supervisord")
        assert exe is not None
        self.proc = subprocess.Popen(
            [exe, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ctl = self.ctl_command()

        def running() -> bool:
            out = subprocess.run(ctl, capture_output=True, text=True, check=False).stdout
            return "RUNNING" in out

        _wait(running, 30, "supervisord's program RUNNING")
        return self

    def ctl_command(self) -> list[str]:
        return [_script("supervisorctl") or "supervisorctl", "-c", str(self.config), "status"]

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _time_command(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({done.returncode}): {done.stderr.decode()}")
    return elapsed


def bench_command(folder: Path, env: dict[str, str], runs: int) -> dict[str, Any]:
    """Time `devmgr status` and `supervisorctl status` alternately, `runs` times each."""
    results: dict[str, Any] = {}
    with DevmgrManager(folder, 1, env) as manager:
        devmgr_cmd = [_script("devmgr") or "devmgr", "status", "-c", str(manager.config)]
        have_supervisor = _script("supervisord") is not None and _script("supervisorctl")
        timings: dict[str, list[float]] = {"devmgr status": []}
        if have_supervisor:
            timings["supervisorctl status"] = []
            sup_ctx: Any = Supervisord(folder)
        else:
            print("supervisord is not installed (pip install supervisor): skipped", file=sys.stderr)
            sup_ctx = None
        if sup_ctx is not None:
            sup_ctx.__enter__()
        try:
            commands = {"devmgr status": devmgr_cmd}
            if sup_ctx is not None:
                commands["supervisorctl status"] = sup_ctx.ctl_command()
            for cmd in commands.values():  # fill the bytecode and page caches, untimed
                _time_command(cmd, env)
            for _ in range(runs):
                for name, cmd in commands.items():
                    timings[name].append(_time_command(cmd, env))
        finally:
            if sup_ctx is not None:
                sup_ctx.__exit__(None, None, None)
    for name, values in timings.items():
        results[name] = _summary(values)
    if "supervisorctl status" in results:
        results["ratio_median"] = round(
            results["devmgr status"]["median_ms"] / results["supervisorctl status"]["median_ms"], 3
        )
    return results


def bench_roundtrip(folder: Path, env: dict[str, str], devices: int, count: int) -> dict[str, Any]:
    """Median and p99 of `Client.status()` round trips against `devices` devices."""
    from devmgr import Client

    sub = folder / f"rt{devices}"
    sub.mkdir()
    with DevmgrManager(sub, devices, env) as manager, Client(manager.endpoint) as client:
        for _ in range(min(200, count)):  # warm up: connection, caches
            client.status()
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            client.status()
            samples.append(time.perf_counter() - started)
    return _summary(samples)


def main(argv: list[str] | None = None) -> int:
    """Run both parts and print a report (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--roundtrips", type=int, default=2000)
    parser.add_argument("--devices", default="1,100", help="device counts for part 2")
    parser.add_argument("--skip-command", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dmb-", dir="/tmp") as tmp:
        folder = Path(tmp)
        runtime = folder / "run"
        runtime.mkdir(mode=0o700)
        env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
        env.pop("DEVMGR_CONFIG", None)
        env.pop("DEVMGR_ENDPOINT", None)
        # Both commands run from compiled bytecode, as after `pip install` (which compiles
        # it): with PYTHONDONTWRITEBYTECODE an editable checkout would recompile devmgr's
        # modules on every run while site-packages ships .pyc files. A private cache
        # prefix, filled by the untimed first run, puts both on the same footing.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        if not args.skip_command:
            report["command"] = bench_command(folder, env, args.runs)
        report["roundtrip"] = {}
        for devices in (int(n) for n in args.devices.split(",") if n):
            report["roundtrip"][f"{devices} devices"] = bench_roundtrip(
                folder, env, devices, args.roundtrips
            )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, stats in report.get("command", {}).items():
        if isinstance(stats, dict):
            print(
                f"{name:22s} median {stats['median_ms']:7.1f} ms  min {stats['min_ms']:7.1f}"
                f"  max {stats['max_ms']:7.1f}  (n={stats['n']})"
            )
    if "ratio_median" in report.get("command", {}):
        print(f"{'ratio (median)':22s} {report['command']['ratio_median']:.2f}x  (goal <= 0.5x)")
    for name, stats in report["roundtrip"].items():
        print(
            f"Client.status() {name:12s} median {stats['median_ms']:.3f} ms  "
            f"p99 {stats['p99_ms']:.3f} ms  (n={stats['n']})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
