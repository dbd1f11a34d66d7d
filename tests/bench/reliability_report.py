"""Run the reliability suite and print its figures as the README's "Reliability" table.

Usage: python tests/bench/reliability_report.py [--short] [--json FILE] [-k EXPR]

Runs `pytest -m slow tests/test_reliability.py` (the long versions; `--short`: the default
ones) with $RELIABILITY_FIGURES pointing at a scratch file, then prints one markdown row
per scenario run: what was injected, what was checked, the result, and the command that
reproduces it. Exits with pytest's status, so a failing scenario is never a silent row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LONG = "pytest -m slow tests/test_reliability.py"
SHORT = "pytest tests/test_reliability.py"


def _chaos(f: dict[str, Any]) -> tuple[str, str, str]:
    faults = ", ".join(f"{n} {k}" for k, n in sorted(f["faults"].items()))
    return (
        f"{f['faults_total']} faults in {f['chaos_s']} s on {f['devices']} devices under "
        f"traffic ({faults}); seed {f['seed']}",
        "manager answers; every device running again; restarts = faults per device; each "
        "exit event's reason/signal matches its fault; no zombies; manager fds +<=8, RSS "
        "+<=16 MiB",
        f"pass: restarts {f['restarts_total']}/{f['faults_total']}, recovered in "
        f"{f['recovery_s']} s, manager fds {f['manager_fds'][0]}->{f['manager_fds'][1]}, RSS "
        f"{f['manager_rss_mib'][0]}->{f['manager_rss_mib'][1]} MiB; "
        f"{f['messages_sent'] - f['messages_received']} of {f['messages_sent']} messages "
        "lost to the faults, 0 duplicates",
    )


def _death(f: dict[str, Any]) -> tuple[str, str, str]:
    stopped = ", one of them SIGSTOPped just before" if f.get("stopped_device") else ""
    return (
        f"SIGKILL of `devmgr start` with {f['devices']} devices under traffic{stopped}",
        "every device child gone within 2 s; a new manager on the same config runs all "
        "devices within 5 s; traffic flows again",
        f"pass: devices gone in {f['devices_gone_s']} s (all children {f['all_children_gone_s']}"
        f" s); new manager all running in {f['restart_to_all_running_s']} s",
    )


def _graceful(f: dict[str, Any]) -> tuple[str, str, str]:
    return (
        f"SIGTERM of `devmgr start` with {f['devices']} devices at full sender speed "
        "(senders stop at the signal)",
        "exit 0 within stop_timeout + 1 s (3 s); no child left; messages in flight "
        "delivered vs dropped",
        f"pass: exit {f['exit_code']} in {f['exit_s']} s; {f['in_flight_at_sigterm']} in flight"
        f" at SIGTERM, {f['delivered_after_sigterm']} delivered after it, "
        f"{f['dropped_in_devices']} dropped in devices, {f['still_in_sender']} never left "
        "the senders",
    )


def _hung(f: dict[str, Any]) -> tuple[str, str, str]:
    return (
        f"SIGTERM of `devmgr start` with {f['devices']} devices, one SIGSTOPped",
        "exit 0 within stop_timeout + 1 s (3 s); the hung device SIGKILLed; no child left",
        f"pass: exit {f['exit_code']} in {f['exit_s']} s",
    )


def _restart(f: dict[str, Any]) -> tuple[str, str, str]:
    rate = f.get("rate", 2000.0)
    return (
        f"{f['restarts']} restarts ({'`devmgr restart`' if f['via'] == 'cli' else 'Client'})"
        f" of one device at {rate:g} msg/s, {f['topology']}",
        "each restart gives a new running pid; no duplicates; every message the old child "
        "forwarded arrives; loss <= 50 ms of traffic per restart",
        f"pass: lost {f['lost']} of {f['sent']} ({f['lost_after_forwarding']} after forwarding)",
    )


def _burst(f: dict[str, Any]) -> tuple[str, str, str]:
    lost = f["lost"]
    verdict = "pass" if f["transport"] == "tcp" else "reported"
    transport = f["transport"]
    if f.get("in_rcvhwm") is not None:
        transport += f", device in-socket rcvhwm = {f['in_rcvhwm']}"
        verdict = "pass"
    reported = verdict == "reported"
    return (
        f"{f['runs']} x {f['count']:,} messages of 64 B sent at full speed "
        f"(~{max(f['send_rate']):,} msg/s) then disconnect, over {transport}",
        "all arrive through a manager-run monitored_queue"
        + (" (figure only: libzmq ipc issue 4660)" if reported else ""),
        f"{verdict}: lost per run {lost}",
    )


def _fuzz(f: dict[str, Any]) -> tuple[str, str, str]:
    codes = ", ".join(f"{n} {c}" for c, n in sorted(f["replies_by_code"].items()))
    return (
        f"{f['requests']} malformed control requests (seed {f['seed']}) + one 17 MiB frame, "
        "3 devices under traffic",
        "each answered with the right error code; devices keep their pids; traffic loses "
        "nothing; manager answers ping throughout",
        f"pass: {codes}; worst ping {f['worst_ping_ms_during_fuzz']} ms",
    )


def _configs(f: dict[str, Any]) -> tuple[str, str, str]:
    return (
        f"{f['cases']} bad configs through `devmgr start` and `validate` "
        f"({f.get('cli_runs', 0)} runs), `add` and `reload`",
        "exit 2 / invalid_spec, the problem's place named, nothing starts, the running "
        "device keeps its pid",
        f"pass: {f.get('cli_runs', 0)} CLI runs refused, {f['add_refused']} adds and "
        f"{f['reload_refused']} reloads refused",
    )


def _garbage(f: dict[str, Any]) -> tuple[str, str, str]:
    injected = ", ".join(f"{n} {k}" for k, n in sorted(f["injected"].items()))
    return (
        f"queue (ROUTER/DEALER, maxmsgsize 4096, router_mandatory): {injected}",
        "device still running (or restarted with the reason logged); a REQ round trip works after",
        f"pass: crashed {f['device_crashed']}, restarts {f['restarts']}",
    )


def _memory(f: dict[str, Any]) -> tuple[str, str, str]:
    return (
        f"a device queueing towards a peer that never comes, max_rss_mb = {f['limit_mb']}",
        "restarted with reason `memory`, `device.unhealthy ... reason=memory` logged",
        f"pass: tripped after {f['tripped_after_s']} s ({f['sent_mib']} MiB sent)",
    )


def _stalled_mon(f: dict[str, Any]) -> tuple[str, str, str]:
    return (
        f"{f['rounds']} x {f['count']:,} messages of {f['size']} B with a monitor subscriber "
        "that stopped reading",
        "data path >= 0.5x its rate with nobody subscribed; device RSS +<=16 MiB",
        f"pass: {f['rate_stalled_sub']:,} msg/s vs {f['rate_no_sub']:,} without subscriber "
        f"({f['ratio']}x; {f['rate_reading_sub']:,} with a reading one); RSS "
        f"{f['device_rss_mib'][0]}->{f['device_rss_mib'][1]} MiB",
    )


def _stalled_recv(f: dict[str, Any]) -> tuple[str, str, str]:
    return (
        f"a receiver that stopped reading; messages of {f['size']} B, every HWM {f['hwm_each']}",
        f"the sender is refused after <= 4 HWMs + 4 MiB of kernel buffers ({f['bound']}); "
        "nothing lost once it reads",
        f"pass: refused after {f['accepted_before_pushback']} messages; device RSS "
        f"{f['device_rss_mib'][0]}->{f['device_rss_mib'][1]} MiB; all "
        f"{f['received_after']} arrived",
    )


ROWS = {
    "chaos": ("1. Chaos", _chaos),
    "manager_death": ("2. Manager SIGKILL", _death),
    "graceful_shutdown": ("3. Graceful shutdown", _graceful),
    "hung_shutdown": ("3. Shutdown, hung device", _hung),
    "planned_restart": ("4. Planned restart", _restart),
    "burst": ("5. Burst then disconnect", _burst),
    "control_fuzz": ("6a. Control fuzz", _fuzz),
    "bad_configs": ("6b. Bad configs", _configs),
    "garbage_peers": ("6c. Garbage peers", _garbage),
    "memory_limit": ("7a. Memory limit", _memory),
    "stalled_monitor": ("7b. Stalled monitor", _stalled_mon),
    "stalled_receiver": ("7c. Stalled receiver", _stalled_recv),
}


def table(lines: list[dict[str, Any]]) -> str:
    out = [
        "| Scenario | Injected | Checked | Result | Reproduce |",
        "| --- | --- | --- | --- | --- |",
    ]
    order = list(ROWS)
    for f in sorted(lines, key=lambda x: order.index(x["scenario"])):
        title, fmt = ROWS[f["scenario"]]
        injected, checked, result = fmt(f)
        command = LONG if f["mode"] == "long" else SHORT
        test = f.get("test", "")
        if test:
            command += f" -k {test}"
        out.append(f"| {title} | {injected} | {checked} | {result} | `{command}` |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="run the default (short) versions")
    parser.add_argument("--json", type=Path, help="also write the figures here (JSON lines)")
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        figures = Path(scratch) / "figures.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_reliability.py",
            "-q",
            "-p",
            "no:cacheprovider",
        ]
        if not args.short:
            cmd += ["-m", "slow"]
        if args.k:
            cmd += ["-k", args.k]
        env = {**os.environ, "RELIABILITY_FIGURES": str(figures)}
        status = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
        lines = (
            [json.loads(x) for x in figures.read_text().splitlines()] if figures.exists() else []
        )
    if args.json:
        args.json.write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(table(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
