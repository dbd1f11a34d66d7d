"""Keys (issue 11 part 6): bad files in authorized_keys, unprotected secret keys,
`devmgr keygen`'s file modes, and a client that a hostile ZMTP peer cannot knock over."""

from __future__ import annotations

import ast
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ctl_support import devmgr_command, manager_settings, private_env, to_toml

import devmgr
from devmgr import Client, ConfigError, ManagerUnreachable
from devmgr._certs import MAX_CERTIFICATE_BYTES, _too_open
from devmgr._config import load_config
from devmgr._security import create_certificate_pair


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def run(ipc_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*devmgr_command(), *argv],
        env=private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def curve_files(ipc_dir: Path) -> tuple[Path, Path, Path]:
    """Keys beside a CURVE config: (config, client secret, manager public)."""
    manager_public, _ = create_certificate_pair(ipc_dir / "keys", "manager")
    client_public, client_secret = create_certificate_pair(ipc_dir / "clients", "alice")
    authorized = ipc_dir / "keys" / "authorized"
    authorized.mkdir()
    shutil.copy(client_public, authorized)
    settings = manager_settings(
        ipc_dir, control=f"ipc://{ipc_dir}/control", events=f"ipc://{ipc_dir}/events"
    )
    tables = {
        "manager": settings,
        "manager.curve": {
            "secret_key": "keys/manager.key_secret",
            "authorized_keys": "keys/authorized",
        },
    }
    config = ipc_dir / "curve.toml"
    config.write_text(to_toml(tables))
    return config, client_secret, manager_public


# ---- authorized_keys: one bad file does not lock everybody out -----------------------


def test_bad_files_in_authorized_keys_are_skipped_and_logged(
    ipc_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config, client_secret, manager_public = curve_files(ipc_dir)
    authorized = ipc_dir / "keys" / "authorized"
    bad = {
        "garbage.key": b"\x00\xff garbage \x01" * 10,
        "empty.key": b"",
        "short.key": b'curve\n    public-key = "tooshort"\n',
        # a valid key line, then more than any certificate holds
        "huge.key": (authorized / "alice.key").read_bytes() + b"#" * MAX_CERTIFICATE_BYTES,
    }
    for name, data in bad.items():
        (authorized / name).write_bytes(data)
    (authorized / "folder.key").mkdir()
    os.mkfifo(authorized / "fifo.key")  # opened for a blocking read, it would hang ZAP
    caplog.set_level(logging.WARNING, logger="devmgr")
    with (
        devmgr.Manager(load_config(config)),
        Client(f"ipc://{ipc_dir}/control", timeout=5, curve=(client_secret, manager_public)) as c,
    ):
        assert c.ping() == "pong"
        assert c.ping() == "pong"  # a second handshake-free request, same connection
    with Client(f"ipc://{ipc_dir}/control", timeout=5, curve=(client_secret, manager_public)):
        pass
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    for name in [*bad, "folder.key", "fifo.key"]:
        lines = [m for m in skipped if str(authorized / name) in m]
        assert len(lines) == 1, (name, skipped)  # named, and once (not per handshake)
    assert not any("alice.key" in m for m in skipped)


def test_a_new_bad_file_does_not_cost_the_good_keys(
    ipc_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The folder is re-read per handshake: garbage added while running is skipped too."""
    config, client_secret, manager_public = curve_files(ipc_dir)
    caplog.set_level(logging.WARNING, logger="devmgr")
    with devmgr.Manager(load_config(config)):
        (ipc_dir / "keys" / "authorized" / "later.key").write_bytes(b"not a certificate")
        with Client(
            f"ipc://{ipc_dir}/control", timeout=5, curve=(client_secret, manager_public)
        ) as client:
            assert client.ping() == "pong"
    assert any("later.key" in r.getMessage() for r in caplog.records)


# ---- secret keys that other users can read ------------------------------------------


def test_manager_refuses_a_group_or_world_readable_secret_key(ipc_dir: Path) -> None:
    config, _, _ = curve_files(ipc_dir)
    secret = ipc_dir / "keys" / "manager.key_secret"
    for mode in (0o644, 0o640, 0o604):
        os.chmod(secret, mode)
        for command in ("validate", "start"):
            done = run(ipc_dir, command, "-c", str(config))
            assert done.returncode == 2, (mode, command, done.stdout, done.stderr)
            out = done.stdout + done.stderr
            assert "manager.curve.secret_key" in out and "too open" in out, out
            assert f"{mode:04o}" in out and "chmod 600" in out
            assert not (ipc_dir / "control").exists()  # nothing was bound
    os.chmod(secret, 0o600)
    done = run(ipc_dir, "validate", "-c", str(config))
    assert done.returncode == 0, done.stdout
    os.chmod(secret, 0o400)
    assert run(ipc_dir, "validate", "-c", str(config)).returncode == 0


def test_client_refuses_a_readable_secret_key(ipc_dir: Path) -> None:
    _, client_secret, manager_public = curve_files(ipc_dir)
    os.chmod(client_secret, 0o644)
    with pytest.raises(ConfigError, match="too open"):
        Client(f"ipc://{ipc_dir}/control", curve=(client_secret, manager_public))
    done = run(
        ipc_dir,
        "ping",
        "-e",
        f"ipc://{ipc_dir}/control",
        "--curve-client",
        str(client_secret),
        "--curve-server",
        str(manager_public),
    )
    assert done.returncode == 2 and "too open" in done.stderr, done.stderr
    # the server's certificate is public: its mode does not matter
    os.chmod(client_secret, 0o600)
    os.chmod(manager_public, 0o644)
    Client(f"ipc://{ipc_dir}/control", curve=(client_secret, manager_public)).close()


def _stat(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


def test_which_modes_are_too_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """As ssh for one's own key; a root-owned key may be group-readable for a service
    account (root:devmgr 0640, as PostgreSQL allows); never anything for others."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert not _too_open(_stat(0o600, 1000)) and not _too_open(_stat(0o400, 1000))
    for mode in (0o640, 0o604, 0o644, 0o660, 0o606, 0o601):
        assert _too_open(_stat(mode, 1000)), oct(mode)
    assert not _too_open(_stat(0o640, 0)) and not _too_open(_stat(0o440, 0))
    for mode in (0o644, 0o660, 0o650, 0o604):
        assert _too_open(_stat(mode, 0)), oct(mode)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert _too_open(_stat(0o640, 0))  # root's own key: as strict as anyone's


# ---- devmgr keygen --------------------------------------------------------------------

_WATCH = r"""
import os, sys
folder = sys.argv[1]
seen = []
busy = False

def hook(event, args):
    global busy
    if busy:
        return
    busy = True
    try:
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if "key_secret" in name:
                st = os.lstat(os.path.join(folder, name))
                seen.append((event, name, st.st_mode & 0o777))
    finally:
        busy = False

sys.addaudithook(hook)
from devmgr._cli import main
status = main(["keygen", folder, "--name", "manager"])
print(repr(seen))
sys.exit(status)
"""


def test_keygen_creates_the_secret_key_0600_from_the_start(ipc_dir: Path) -> None:
    """Watched between every audited operation of the process (open, chmod, link...), the
    secret key file never has a group or other bit, in an existing 0755 folder too."""
    folder = ipc_dir / "keys"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    done = subprocess.run(
        [sys.executable, "-c", _WATCH, str(folder)],
        env=private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert done.returncode == 0, done.stderr
    seen = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert seen, "the hook saw no secret key file at all"
    assert all(mode & 0o077 == 0 for _event, _name, mode in seen), seen
    assert (folder / "manager.key_secret").stat().st_mode & 0o777 == 0o600
    assert (folder / "manager.key").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in folder.iterdir()) == ["manager.key", "manager.key_secret"]
    import zmq.auth

    public, secret = zmq.auth.load_certificate(str(folder / "manager.key_secret"))
    assert secret and zmq.auth.load_certificate(str(folder / "manager.key")) == (public, None)


def test_keygen_never_overwrites_and_refuses_odd_names(ipc_dir: Path) -> None:
    folder = ipc_dir / "keys"
    folder.mkdir()
    (folder / "manager.key").symlink_to(ipc_dir / "elsewhere")  # a dangling symlink
    done = run(ipc_dir, "keygen", str(folder), "--name", "manager")
    assert done.returncode == 2 and "exists" in done.stderr
    assert not (ipc_dir / "elsewhere").exists() and not (folder / "manager.key_secret").exists()
    done = run(ipc_dir, "keygen", str(folder), "--name", "../x")
    assert done.returncode == 2 and "plain file name" in done.stderr
    assert not (ipc_dir / "x.key").exists()


# ---- a hostile ZMTP peer --------------------------------------------------------------

_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00")
_GREETING += b"\x00" * 32


def _ready(props: bytes) -> bytes:
    body = b"\x05READY" + props
    return struct.pack(">BB", 0x04, len(body)) + body


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


@pytest.fixture
def hostile(ipc_dir: Path) -> Iterator[Callable[[bytes], str]]:
    """A plain-socket server that greets, then sends the given bytes and waits."""
    servers: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(then: bytes) -> str:
        path = str(ipc_dir / f"hostile{len(servers)}")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(4)
        server.settimeout(10)
        servers.append(server)

        def serve() -> None:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                conn.sendall(_GREETING)
                try:
                    got = b""
                    while len(got) < 64:
                        chunk = conn.recv(64 - len(got))
                        if not chunk:
                            return
                        got += chunk
                    conn.sendall(then)
                    while conn.recv(65536):  # hold the connection open until the client goes
                        pass
                except OSError:
                    return

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return f"ipc://{path}"

    try:
        yield start
    finally:
        for server in servers:
            server.close()
        for thread in threads:
            thread.join(10)


READY_OK = _ready(_property(b"Socket-Type", b"ROUTER"))
HOSTILE = {
    "huge frame": READY_OK + struct.pack(">BQ", 0x02, 1 << 62),
    "huge command": struct.pack(">BQ", 0x06, 1 << 62),
    "huge command after READY": READY_OK + struct.pack(">BQ", 0x06, 1 << 40),
    "truncated READY property": _ready(b"\x0bSocket-Type\x00\x00"),
    "READY value longer than the frame": _ready(b"\x0bSocket-Type\x00\x00\x00\xff" + b"ROUTER"),
    "empty command": struct.pack(">BB", 0x04, 0),
    "command name longer than the frame": struct.pack(">BB", 0x04, 3) + b"\x09AB",
    "empty command after READY": READY_OK + struct.pack(">BB", 0x04, 0),
    "reserved flags": READY_OK + struct.pack(">BB", 0x80, 1) + b"x",
}


@pytest.mark.parametrize("what", list(HOSTILE))
def test_client_survives_a_hostile_zmtp_peer(what: str, hostile: Callable[[bytes], str]) -> None:
    """devmgr's own error, in time: no MemoryError, struct.error or IndexError."""
    endpoint = hostile(HOSTILE[what])
    started = time.monotonic()
    with (
        Client(endpoint, timeout=10, transport="zmtp") as client,
        pytest.raises(ManagerUnreachable) as caught,
    ):
        client.ping()
    assert time.monotonic() - started < 5  # at once, not at the timeout
    message = str(caught.value)
    assert endpoint in message, message
