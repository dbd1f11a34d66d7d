"""Device processes from devmgr's own zygote: no stdlib internals, no __main__, no orphans."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from conftest import wait_until

# the checkout's sources (CI installs the package into site-packages, without core/)
PACKAGE = Path(__file__).resolve().parents[1] / "devmgr"
CORE = PACKAGE.parent / "core"

# multiprocessing's documented modules; every other one (forkserver, popen_*, spawn,
# context, util, reduction, resource_tracker, ...) is an implementation detail.
_PUBLIC_MP_MODULES = {
    "multiprocessing",
    "multiprocessing.connection",
    "multiprocessing.dummy",
    "multiprocessing.managers",
    "multiprocessing.pool",
    "multiprocessing.process",
    "multiprocessing.shared_memory",
    "multiprocessing.sharedctypes",
}
_PRIVATE_NAMES = re.compile(
    r"popen_fork|popen_forkserver|popen_spawn|_forkserver|_resource_tracker|resource_tracker"
    r"|\b_launch\b|process\._children|forkserver\.|set_spawning_popen"
)


def _sources() -> list[Path]:
    files = [p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".pyi", ".pyx", ".pxi")]
    files += [p for p in CORE.rglob("*") if p.suffix in (".pyx", ".pxi", ".pxd")]
    return sorted(files)


def private_multiprocessing_uses(path: Path) -> list[str]:
    """Name each use of a private multiprocessing module or attribute in one file."""
    text = path.read_text()
    found = [f"{path.name}: {m.group(0)!r}" for m in _PRIVATE_NAMES.finditer(text)]
    if path.suffix not in (".py", ".pyi"):
        return found
    tree = ast.parse(text)
    mp_names: set[str] = set()  # local names bound to multiprocessing or its parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "multiprocessing":
                    if alias.name not in _PUBLIC_MP_MODULES:
                        found.append(f"{path.name}:{node.lineno}: import {alias.name}")
                    mp_names.add(alias.asname or "multiprocessing")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("multiprocessing"):
            module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                submodule = module == "multiprocessing" and bool(importlib.util.find_spec(full))
                if (
                    module not in _PUBLIC_MP_MODULES
                    or (submodule and full not in _PUBLIC_MP_MODULES)
                    or alias.name.startswith("_")
                ):
                    found.append(f"{path.name}:{node.lineno}: from {module} import {alias.name}")
                mp_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if node.attr.startswith("__") and node.attr.endswith("__"):
                continue
            root: ast.expr = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in mp_names:
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    return found


def test_devmgr_uses_no_private_multiprocessing_names() -> None:
    sources = _sources()
    assert any(p.name == "_fleet.py" for p in sources) and any(p.suffix == ".pyx" for p in sources)
    found = [use for path in sources for use in private_multiprocessing_uses(path)]
    assert found == []


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The checker flags each form the old spawner used (so the test above can fail)."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        textwrap.dedent(
            """
            import multiprocessing.forkserver
            import multiprocessing.process
            from multiprocessing import popen_forkserver, util
            mp = multiprocessing.forkserver._forkserver
            multiprocessing.process._children.discard(None)
            class P(popen_forkserver.Popen):
                def _launch(self, obj): pass
            """
        )
    )
    found = "\n".join(private_multiprocessing_uses(sample))
    for expected in (
        "import multiprocessing.forkserver",
        "from multiprocessing import popen_forkserver",
        "from multiprocessing import util",
        "'_forkserver'",
        "._children",
        "_launch",
    ):
        assert expected in found, (expected, found)
    public = tmp_path / "public.py"
    public.write_text(
        "import multiprocessing\nimport multiprocessing.connection\n"
        "from multiprocessing.process import BaseProcess\n"
        "ctx = multiprocessing.get_context('spawn')\n"
        "multiprocessing.connection.wait([])\n"
    )
    assert private_multiprocessing_uses(public) == []


# ---- the process chain ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def _config_text(ipc_dir: Path, names: list[str]) -> str:
    lines = [
        "[manager]",
        f'control = "ipc://{ipc_dir}/control"',
        f'events = "ipc://{ipc_dir}/events"',
        "stop_timeout = 2.0",
    ]
    for name in names:
        lines += [
            f"[devices.{name}]",
            'kind = "streamer"',
            f'in = {{ type = "PULL", bind = ["ipc://{ipc_dir}/{name}-in"] }}',
            f'out = {{ type = "PUSH", bind = ["ipc://{ipc_dir}/{name}-out"] }}',
        ]
    return "\n".join(lines) + "\n"


def _status(ctx: Any, ipc_dir: Path) -> Any:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(f"ipc://{ipc_dir}/control")
    try:
        sock.send(json.dumps({"v": 1, "id": 1, "cmd": "status"}).encode())
        return json.loads(sock.recv())["result"]
    finally:
        sock.close()


def _running_pids(ctx: Any, ipc_dir: Path, count: int) -> list[int]:
    def ready() -> list[int] | None:
        try:
            devices = _status(ctx, ipc_dir)["devices"]
        except zmq.Again:
            return None
        if len(devices) == count and all(d["state"] == "running" for d in devices):
            return [d["pid"] for d in devices]
        return None

    return wait_until(ready, timeout=20, interval=0.05, what="all devices running")


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _start(config: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "devmgr", "start", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        **kwargs,
    )


def _zygote_of(manager_pid: int) -> psutil.Process:
    (zygote,) = [
        child
        for child in psutil.Process(manager_pid).children()
        if child.name() == "devmgr: zygote"  # its comm name
    ]
    return zygote


def test_devices_are_children_of_the_zygote_and_go_with_a_killed_manager(
    ipc_dir: Path, ctx: Any
) -> None:
    config = ipc_dir / "devmgr.toml"
    config.write_text(_config_text(ipc_dir, ["a", "b"]))
    proc = _start(config, stderr=subprocess.DEVNULL)
    try:
        pids = _running_pids(ctx, ipc_dir, 2)
        zygote = _zygote_of(proc.pid)
        assert sorted(c.pid for c in zygote.children()) == sorted(pids)
        assert zygote.cmdline()[0] == "devmgr: zygote"
        proc.kill()
        proc.wait(5)
        wait_until(
            lambda: not _alive([zygote.pid, *pids]), timeout=2.0, what="zygote and devices gone"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_to_the_whole_group_lets_the_devices_drain(ipc_dir: Path, ctx: Any) -> None:
    """As systemd stops a service: SIGTERM to every process; the zygote must not die of it
    (its children would die of their death signal, SIGKILL, before draining)."""
    config = ipc_dir / "devmgr.toml"
    config.write_text(_config_text(ipc_dir, ["a"]))
    proc = _start(config, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _running_pids(ctx, ipc_dir, 1)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        log = stderr.decode()
        assert proc.returncode == 0, log
        exited = [line for line in log.splitlines() if "device.exited a" in line]
        assert exited and "code=0" in exited[0] and "signal=" not in exited[0], log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_APP = """
import os, sys

with open(sys.argv[1], "a") as marks:  # a side effect of importing this module
    marks.write(f"{os.getpid()}\\n")

if __name__ == "__main__":
    import json
    import devmgr
    from devmgr._config import parse_config

    ipc = sys.argv[2]
    config = parse_config({
        "manager": {"control": f"ipc://{ipc}/control", "events": f"ipc://{ipc}/events"},
        "devices": {"a": {
            "kind": "streamer",
            "in": {"type": "PULL", "bind": [f"ipc://{ipc}/a-in"]},
            "out": {"type": "PUSH", "bind": [f"ipc://{ipc}/a-out"]},
        }},
    })
    with devmgr.Manager(config) as manager:
        (dev,) = manager.status()["devices"]
        print(json.dumps({"app": os.getpid(), "device": dev}), flush=True)
"""


def test_device_children_do_not_import_the_applications_main(ipc_dir: Path) -> None:
    app = ipc_dir / "app.py"
    app.write_text(_APP)
    marks = ipc_dir / "marks"
    out = subprocess.run(
        [sys.executable, str(app), str(marks), str(ipc_dir)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    reply = json.loads(out.stdout)
    assert reply["device"]["state"] == "running" and reply["device"]["pid"]
    # only the application itself ran its module; neither the zygote nor the device did
    assert marks.read_text().split() == [str(reply["app"])]


_FORKING_APP = """
import os, sys, time
import devmgr
from devmgr._config import parse_config

ipc = sys.argv[1]
config = parse_config({
    "manager": {"control": f"ipc://{ipc}/control", "events": f"ipc://{ipc}/events"},
    "devices": {"a": {
        "kind": "streamer",
        "in": {"type": "PULL", "bind": [f"ipc://{ipc}/a-in"]},
        "out": {"type": "PUSH", "bind": [f"ipc://{ipc}/a-out"]},
    }},
})
manager = devmgr.Manager(config)
manager.start()
(dev,) = manager.status()["devices"]
worker = os.fork()  # the application's own worker, forked after the manager started
if worker == 0:
    os.read(0, 1)  # lives until the test closes our stdin
    os._exit(0)
print(dev["pid"], worker, flush=True)
os.read(0, 1)  # wait to be killed
"""


def test_a_forked_worker_of_the_application_does_not_keep_the_devices_alive(
    ipc_dir: Path,
) -> None:
    app = ipc_dir / "app.py"
    app.write_text(_FORKING_APP)
    proc = subprocess.Popen(
        [sys.executable, str(app), str(ipc_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    worker = 0
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        device_pid, worker = int(line[0]), int(line[1])
        zygote = _zygote_of(proc.pid)
        proc.kill()  # the manager dies; its forked worker lives on
        proc.wait(5)
        wait_until(
            lambda: not _alive([zygote.pid, device_pid]), timeout=3.0, what="zygote and device gone"
        )
        assert _alive([worker]) == [worker]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()  # the worker's cue to exit
        proc.stdout.close()
        if worker:
            wait_until(lambda: not _alive([worker]), timeout=5.0, what="the worker gone")
