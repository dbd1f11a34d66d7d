"""Process titles: `devmgr: NAME (kind)` for a device, `devmgr: manager CONFIG` for the manager.

Read from /proc of real processes started by a real `devmgr start`, as ps and top read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctl_support import manager_process, monitored, private_env, streamer, write_config

from devmgr import Client
from devmgr._proctitle import comm_name
from devmgr._run import manager_title

from conftest import wait_until


def _cmdline(pid: int) -> str:
    """The title as `ps -o args` shows it: argv joined, setproctitle's NUL padding dropped."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return " ".join(part.decode() for part in raw.split(b"\0") if part)


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")


def test_comm_name_is_the_title_cut_at_15_bytes() -> None:
    assert comm_name("devmgr: manager /etc/devmgr.toml") == b"devmgr: manager"
    assert comm_name("devmgr: orders (streamer)") == b"devmgr: orders"  # no trailing blank
    assert comm_name("devmgr: market-data") == b"devmgr: market-"
    # never half a UTF-8 character
    assert comm_name("devmgr: ééééééé") == "devmgr: ééé".encode()


def test_devices_and_manager_carry_their_titles(ipc_dir: Path) -> None:
    devices = {"orders": monitored(ipc_dir, "orders"), "feed": streamer(ipc_dir, "feed")}
    config = write_config(ipc_dir / "titles.toml", devices)
    with (
        manager_process(config, private_env(ipc_dir)) as proc,
        Client(f"ipc://{ipc_dir}/control", timeout=5) as client,
    ):
        assert _cmdline(proc.pid) == f"devmgr: manager {config}"
        assert _comm(proc.pid) == "devmgr: manager"

        def all_running() -> dict[str, Any] | None:
            status = client.status()
            return status if all(d["state"] == "running" for d in status["devices"]) else None

        status = wait_until(all_running, what="both devices running")
        pids = {d["name"]: d["pid"] for d in status["devices"]}
        assert _cmdline(pids["orders"]) == "devmgr: orders (monitored_queue)"
        assert _comm(pids["orders"]) == "devmgr: orders"
        assert _cmdline(pids["feed"]) == "devmgr: feed (streamer)"
        assert _comm(pids["feed"]) == "devmgr: feed"

        # a restarted device is named again (a new process from the same entry point)
        new = client.restart("feed")[0]
        assert new["pid"] != pids["feed"]
        assert _cmdline(new["pid"]) == "devmgr: feed (streamer)"
        assert _comm(new["pid"]) == "devmgr: feed"


def test_the_embedded_default_is_named_as_such() -> None:
    # (a real manager on the embedded default would bind its fixed tcp ports)
    assert manager_title(None) == "devmgr: manager (embedded default)"
    assert manager_title(Path("/etc/devmgr.toml")) == "devmgr: manager /etc/devmgr.toml"
