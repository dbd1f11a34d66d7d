"""CURVE on the control socket: who gets in, who gets nothing, and what config refuses."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ctl_support import devmgr_command, manager_settings, private_env, to_toml

import devmgr
from devmgr import Client, ManagerUnreachable
from devmgr._config import load_config
from devmgr._security import _AUTHORIZERS, create_certificate_pair


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Keys:
    manager_public: Path
    client_secret: Path
    stranger_secret: Path
    authorized: Path


@pytest.fixture
def keys(ipc_dir: Path) -> Keys:
    """A manager pair, an authorised client pair and a stranger's pair."""
    manager_public, _ = create_certificate_pair(ipc_dir / "keys", "manager")
    client_public, client_secret = create_certificate_pair(ipc_dir / "clients", "alice")
    _, stranger_secret = create_certificate_pair(ipc_dir / "strangers", "mallory")
    authorized = ipc_dir / "keys" / "authorized"
    authorized.mkdir()
    shutil.copy(client_public, authorized)
    return Keys(manager_public, client_secret, stranger_secret, authorized)


def curve_config(ipc_dir: Path, control: str, events: str) -> Path:
    """A config whose [manager.curve] paths are relative to the file's folder."""
    settings = manager_settings(ipc_dir, control=control, events=events)
    tables = {
        "manager": settings,
        "manager.curve": {
            "secret_key": "keys/manager.key_secret",
            "authorized_keys": "keys/authorized",
        },
    }
    path = ipc_dir / "curve.toml"
    path.write_text(to_toml(tables))
    return path


@pytest.fixture(params=["tcp", "ipc"])
def curve_manager(request: pytest.FixtureRequest, ipc_dir: Path, keys: Keys) -> Iterator[str]:
    """An embedded CURVE manager; yields its control endpoint."""
    if request.param == "tcp":
        control = f"tcp://127.0.0.1:{free_tcp_port()}"
        events = f"tcp://127.0.0.1:{free_tcp_port()}"
    else:
        control, events = f"ipc://{ipc_dir}/control", f"ipc://{ipc_dir}/events"
    with devmgr.Manager(load_config(curve_config(ipc_dir, control, events))):
        yield control


def test_authorised_client_works(curve_manager: str, keys: Keys, ipc_dir: Path) -> None:
    with Client(curve_manager, curve=(keys.client_secret, keys.manager_public)) as client:
        assert client.ping() == "pong"
        assert client.status()["devices"] == []
    # the CLI, with options and with the environment
    curve_opts = [
        "--curve-client",
        str(keys.client_secret),
        "--curve-server",
        str(keys.manager_public),
    ]
    done = subprocess.run(
        [*devmgr_command(), "ping", "-e", curve_manager, *curve_opts],
        env=private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "pong\n"), done.stderr
    env = private_env(
        ipc_dir,
        DEVMGR_CURVE_CLIENT=str(keys.client_secret),
        DEVMGR_CURVE_SERVER=str(keys.manager_public),
        DEVMGR_ENDPOINT=curve_manager,
    )
    done = subprocess.run(
        [*devmgr_command(), "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_unauthorised_clients_get_nothing(curve_manager: str, keys: Keys, ipc_dir: Path) -> None:
    # a key not in authorized_keys
    with (
        Client(
            curve_manager, timeout=0.5, curve=(keys.stranger_secret, keys.manager_public)
        ) as client,
        pytest.raises(ManagerUnreachable),
    ):
        client.ping()
    # an authorised key that expects another server key (a man in the middle, say)
    with (
        Client(
            curve_manager, timeout=0.5, curve=(keys.client_secret, keys.client_secret)
        ) as client,
        pytest.raises(ManagerUnreachable),
    ):
        client.ping()
    # no CURVE at all, through either transport
    for transport in ("zmtp", "zmq"):
        with (
            Client(curve_manager, timeout=0.5, transport=transport) as client,
            pytest.raises(ManagerUnreachable),
        ):
            client.ping()
    done = subprocess.run(
        [
            *devmgr_command(),
            "status",
            "-e",
            curve_manager,
            "--timeout",
            "0.5",
            "--curve-client",
            str(keys.stranger_secret),
            "--curve-server",
            str(keys.manager_public),
        ],
        env=private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    # and the authorised client still gets in afterwards
    with Client(curve_manager, curve=(keys.client_secret, keys.manager_public)) as client:
        assert client.ping() == "pong"


def test_authorized_keys_are_read_per_connection(
    curve_manager: str, keys: Keys, ipc_dir: Path
) -> None:
    stranger = (keys.stranger_secret, keys.manager_public)
    with Client(curve_manager, timeout=0.5, curve=stranger) as client:
        with pytest.raises(ManagerUnreachable):
            client.ping()
        shutil.copy(ipc_dir / "strangers" / "mallory.key", keys.authorized)
        client.timeout = 5
        assert client.ping() == "pong"  # a new connection, a new ZAP check


def test_fails_closed_without_the_authoriser(curve_manager: str, keys: Keys) -> None:
    """If the ZAP thread is gone, nobody gets in (libzmq would otherwise admit any key)."""
    for auth in list(_AUTHORIZERS.values()):
        auth.stop()
    with (
        Client(
            curve_manager, timeout=0.5, curve=(keys.client_secret, keys.manager_public)
        ) as client,
        pytest.raises(ManagerUnreachable),
    ):
        client.ping()


def test_non_loopback_tcp_control_needs_curve(ipc_dir: Path) -> None:
    """Refused at config validation: `devmgr start` exits 2 and binds nothing."""
    port = free_tcp_port()
    settings = manager_settings(
        ipc_dir, control=f"tcp://0.0.0.0:{port}", events=f"tcp://127.0.0.1:{free_tcp_port()}"
    )
    path = ipc_dir / "open.toml"
    path.write_text(to_toml({"manager": settings}))
    done = subprocess.run(
        [*devmgr_command(), "start", "-c", str(path)],
        env=private_env(ipc_dir),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "manager.control" in done.stderr and "[manager.curve]" in done.stderr
    with socket.socket() as probe:  # nothing was bound
        probe.bind(("127.0.0.1", port))


def test_events_are_curve_too(curve_manager: str, keys: Keys, ipc_dir: Path) -> None:
    """With [manager.curve] the events socket admits only authorised keys, as control does."""
    import zmq

    with Client(curve_manager, curve=(keys.client_secret, keys.manager_public)) as client:
        events = client.status()["manager"]["events"]
        client_keys = client.curve_keys
    assert client_keys is not None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        plain = ctx.socket(zmq.SUB)
        trusted = ctx.socket(zmq.SUB)
        for sock in (plain, trusted):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        public, secret, server = client_keys
        trusted.setsockopt(zmq.CURVE_PUBLICKEY, public)
        trusted.setsockopt(zmq.CURVE_SECRETKEY, secret)
        trusted.setsockopt(zmq.CURVE_SERVERKEY, server)
        plain.connect(events)
        trusted.connect(events)
        spec = {
            "name": "ev",
            "kind": "streamer",
            "in": {"type": "PULL", "bind": [f"ipc://{ipc_dir}/ev-in"]},
            "out": {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/ev-out"]},
        }
        with Client(curve_manager, curve=(keys.client_secret, keys.manager_public)) as client:
            # add devices until the trusted subscriber has seen an event (the
            # subscription takes a moment to reach the PUB), at most a few times
            for attempt in range(10):
                client.add(
                    {**spec, "name": f"ev{attempt}"}
                    | {
                        "in": {"type": "PULL", "bind": [f"ipc://{ipc_dir}/ev{attempt}-in"]},
                        "out": {"type": "PUSH", "bind": [f"ipc://{ipc_dir}/ev{attempt}-out"]},
                    }
                )
                if trusted.poll(500):
                    break
        topic, _body = trusted.recv_multipart()
        assert topic.startswith(b"device.")
        assert plain.poll(300) == 0, "an unauthenticated subscriber received events"
    finally:
        ctx.destroy(linger=0)
