"""devmgr.Client against a real manager: every method, errors, timeouts, endpoint resolution."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from ctl_support import manager_process, manager_settings, private_env, streamer, write_config

import devmgr
from devmgr import Client, ConfigError, ControlError, ManagerUnreachable
from devmgr._client import connectable, control_endpoint_of, resolve_endpoint
from devmgr._config import load_config, parse_device

from conftest import wait_until

TRANSPORTS = pytest.mark.parametrize("transport", ["zmtp", "zmq"])


@pytest.fixture(autouse=True)
def private_runtime(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(ipc_dir))
    for name in ("DEVMGR_ENDPOINT", "DEVMGR_CONFIG", "DEVMGR_CURVE_CLIENT", "DEVMGR_CURVE_SERVER"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def manager(ipc_dir: Path) -> Iterator[devmgr.Manager]:
    path = write_config(ipc_dir / "devmgr.toml", {"a": streamer(ipc_dir, "a")})
    with devmgr.Manager(load_config(path)) as running:
        yield running


def control(ipc_dir: Path) -> str:
    return f"ipc://{ipc_dir}/control"


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@TRANSPORTS
def test_every_method(transport: str, ipc_dir: Path, manager: devmgr.Manager) -> None:
    with Client(control(ipc_dir), timeout=10, transport=transport) as client:
        assert client.ping() == "pong"
        assert client.version() == {"version": devmgr.__version__, "protocol": 1}
        status = client.status()
        assert status["manager"]["pid"] == os.getpid()
        assert [d["name"] for d in status["devices"]] == ["a"]
        assert client.status("a")["devices"][0]["state"] == "running"
        stats = client.stats("a")
        assert len(stats) == 8 and stats["in_msgs_received"] == 0
        assert client.pause("a")["state"] == "paused"
        assert client.resume("a")["state"] == "running"
        assert [d["state"] for d in client.stop("a")] == ["stopped"]
        assert [d["state"] for d in client.start("*")] == ["running"]
        (before,) = client.status("a")["devices"]
        (after,) = client.restart("a")
        assert after["state"] == "running" and after["pid"] != before["pid"]

        # add takes a dict with `name`, or a DeviceSpec
        assert client.add({"name": "b", **streamer(ipc_dir, "b")})["state"] == "running"
        spec = parse_device({"name": "c", **streamer(ipc_dir, "c")})
        assert isinstance(spec, devmgr.DeviceSpec)
        added = client.add(spec)
        assert added["name"] == "c" and added["state"] == "running"
        assert added["endpoints"]["in"]["bind"] == [f"ipc://{ipc_dir}/c-in"]
        assert client.remove("b") is None
        assert client.remove("c") is None
        assert client.reload() == {
            "config": str(manager.config.path),
            "added": [],
            "removed": [],
            "changed": [],
            "unchanged": ["a"],
        }
        assert client.shutdown() is None
    wait_until(lambda: not manager.running, what="the manager to stop")


@TRANSPORTS
def test_error_replies_raise_control_error(
    transport: str, ipc_dir: Path, manager: devmgr.Manager
) -> None:
    with Client(control(ipc_dir), transport=transport) as client:
        with pytest.raises(ControlError) as info:
            client.pause("nope")
        assert info.value.code == "unknown_device" and "nope" in info.value.message
        with pytest.raises(ControlError) as info:
            client.status("a", "nope")
        assert info.value.code == "unknown_device"
        with pytest.raises(ControlError) as info:
            client.add({"name": "a", **streamer(ipc_dir, "a2")})
        assert info.value.code == "conflict"
        with pytest.raises(ControlError) as info:
            client.add({"name": "x", "kind": "bogus"})
        assert info.value.code == "invalid_spec"
        with pytest.raises(ControlError) as info:
            client.request("frobnicate")
        assert info.value.code == "unknown_command"
        with pytest.raises(ControlError) as info:
            client.request("ping", {"pad": "x" * (1 << 20)})
        assert info.value.code in ("too_large", "bad_request")
        assert client.ping() == "pong"  # none of it broke the connection
    with pytest.raises(ValueError):
        Client(control(ipc_dir)).start()  # no names: refused before sending
    with pytest.raises(TypeError):
        Client(control(ipc_dir)).add(42)


@TRANSPORTS
@pytest.mark.parametrize("where", ["ipc", "stale ipc", "tcp"])
def test_unreachable_at_once_when_nothing_listens(
    transport: str, where: str, ipc_dir: Path
) -> None:
    """No socket file, a stale one, a refused tcp port: said at once, not at the timeout."""
    endpoint = f"ipc://{ipc_dir}/nobody" if "ipc" in where else f"tcp://127.0.0.1:{free_tcp_port()}"
    if where == "stale ipc":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(ipc_dir / "nobody"))  # bound, never listening: as after a SIGKILL
        stale.close()
    with Client(endpoint, timeout=30, transport=transport) as client:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(ManagerUnreachable, match="nothing listens") as caught:
                client.ping()
            assert time.monotonic() - started < 10  # not the 30 s timeout
            assert caught.value.listening is False
            assert ("stale" in str(caught.value)) == (where == "stale ipc")


def all_threads_stopped(pid: int) -> bool:
    """Return True once every thread of `pid` is in state T (SIGSTOP takes a moment)."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return all(state == "T" for state in states)


@TRANSPORTS
def test_timeout_does_not_poison_the_next_request(transport: str, ipc_dir: Path) -> None:
    """A frozen manager times a request out; once it thaws, the next request gets its own
    reply, not the stale one."""
    config = write_config(ipc_dir / "devmgr.toml", {})
    with (
        manager_process(config, private_env(ipc_dir)) as proc,
        Client(control(ipc_dir), timeout=5, transport=transport) as client,
    ):
        assert client.ping() == "pong"
        os.kill(proc.pid, signal.SIGSTOP)
        wait_until(lambda: all_threads_stopped(proc.pid), what="the manager to stop")
        try:
            started = time.monotonic()
            with pytest.raises(ManagerUnreachable, match="no reply") as caught:
                client.request("ping", timeout=0.3)
            assert time.monotonic() - started >= 0.25  # something listens: the timeout
            assert caught.value.listening is True
            assert "something listens there but did not answer" in str(caught.value)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        status = client.status()  # a stale "pong" here would be the poisoning
        assert status["manager"]["pid"] == proc.pid
        assert client.version()["protocol"] == 1


@TRANSPORTS
def test_stale_replies_are_discarded(transport: str, ipc_dir: Path) -> None:
    """A reply whose id is not the request's is skipped (a late answer to an old request)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.bind(control(ipc_dir))
    try:
        with Client(control(ipc_dir), timeout=5, transport=transport) as client:
            import threading

            def serve() -> None:
                assert server.poll(5000)
                identity, raw = server.recv_multipart()
                request = json.loads(raw)
                for reply_id in ("stale", [request["id"]], request["id"]):
                    reply = {"v": 1, "id": reply_id, "ok": True, "result": reply_id}
                    server.send_multipart([identity, json.dumps(reply).encode()])

            thread = threading.Thread(target=serve)
            thread.start()
            result = client.request("ping")
            thread.join(5)
            assert isinstance(result, int)  # its own id came back, the others were skipped
    finally:
        server.close()
        ctx.term()


def test_reconnects_after_the_manager_restarts(ipc_dir: Path) -> None:
    """A connected client keeps working when the manager is replaced between requests."""
    config = write_config(ipc_dir / "devmgr.toml", {})
    with Client(control(ipc_dir), timeout=10) as client:
        with manager_process(config, private_env(ipc_dir)) as first:
            assert client.status()["manager"]["pid"] == first.pid
        with manager_process(config, private_env(ipc_dir)) as second:
            assert client.status()["manager"]["pid"] == second.pid


def test_tcp_control(ipc_dir: Path) -> None:
    port = free_tcp_port()
    settings = manager_settings(
        ipc_dir,
        control=f"tcp://127.0.0.1:{port}",
        events=f"tcp://127.0.0.1:{free_tcp_port()}",
        insecure_tcp_control=True,
    )
    from devmgr._config import parse_config

    config = parse_config({"manager": settings, "devices": {}})
    with devmgr.Manager(config):
        for transport in ("zmtp", "zmq"):
            with Client(f"tcp://127.0.0.1:{port}", transport=transport) as client:
                assert client.ping() == "pong"
                # a reply longer than 255 bytes travels in a long frame
                assert client.status()["manager"]["control"] == f"tcp://127.0.0.1:{port}"


def test_closed_client_refuses(ipc_dir: Path) -> None:
    client = Client(control(ipc_dir))
    client.close()
    with pytest.raises(devmgr.DevmgrError, match="closed"):
        client.ping()
    client.close()  # twice is fine


def test_curve_arguments_are_checked(ipc_dir: Path) -> None:
    from devmgr._security import create_certificate_pair

    public, secret = create_certificate_pair(ipc_dir / "keys", "me")
    with pytest.raises(ConfigError, match="secret"):
        Client(control(ipc_dir), curve=(public, public))
    with pytest.raises(ConfigError, match="cannot read"):
        Client(control(ipc_dir), curve=(ipc_dir / "missing", public))
    with pytest.raises(ValueError):
        Client(control(ipc_dir), curve=(secret, public), transport="zmtp")


def test_endpoint_resolution(ipc_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from devmgr._paths import default_control_endpoint

    monkeypatch.chdir(ipc_dir)
    assert resolve_endpoint() == default_control_endpoint()
    assert default_control_endpoint() == f"ipc://{ipc_dir}/devmgr/control"

    # ./devmgr.toml, with a relative ipc path resolved against its folder
    (ipc_dir / "devmgr.toml").write_text('[manager]\ncontrol = "ipc://here/ctl"\n')
    assert resolve_endpoint() == f"ipc://{ipc_dir}/here/ctl"
    # $DEVMGR_CONFIG beats ./devmgr.toml; a file without [manager] control: the default
    other = ipc_dir / "sub"
    other.mkdir()
    (other / "c.toml").write_text("[devices]\n")
    monkeypatch.setenv("DEVMGR_CONFIG", str(other / "c.toml"))
    assert resolve_endpoint() == default_control_endpoint()
    # $DEVMGR_ENDPOINT beats both configs
    monkeypatch.setenv("DEVMGR_ENDPOINT", "tcp://*:7001")
    assert resolve_endpoint() == "tcp://127.0.0.1:7001"
    # -c beats $DEVMGR_ENDPOINT, and -e beats everything
    (other / "d.toml").write_text('[manager]\ncontrol = "ipc:///abs/ctl"\n')
    assert resolve_endpoint(config=str(other / "d.toml")) == "ipc:///abs/ctl"
    assert resolve_endpoint("ipc:///x", str(other / "d.toml")) == "ipc:///x"
    # Client(None) resolves the same way
    assert Client(timeout=1).endpoint == "tcp://127.0.0.1:7001"

    with pytest.raises(ConfigError, match="TOML"):
        (other / "bad.toml").write_text("[manager\n")
        control_endpoint_of(other / "bad.toml")
    with pytest.raises(ConfigError):
        control_endpoint_of(other / "missing.toml")
    assert connectable("tcp://0.0.0.0:5") == "tcp://127.0.0.1:5"
    assert connectable("tcp://[::]:5") == "tcp://[::1]:5"
    assert connectable("tcp://10.0.0.1:5") == "tcp://10.0.0.1:5"
    assert connectable("ipc:///a") == "ipc:///a"


# ---- `[manager] control` of a config file, read with tomllib ---------------------------


def test_control_endpoint_of_the_example_configs() -> None:
    import tomllib

    from devmgr._paths import default_control_endpoint

    # the checkout's examples (CI installs the package into site-packages)
    examples = sorted(Path(__file__).resolve().parents[1].glob("deploy/examples/*.toml"))
    assert examples
    for path in examples:
        expected = tomllib.loads(path.read_text()).get("manager", {}).get("control")
        assert control_endpoint_of(path) == (expected or default_control_endpoint()), path


def test_control_endpoint_of_a_file_that_is_not_toml(tmp_path: Path) -> None:

    path = tmp_path / "bad.toml"
    path.write_text('[manager]\ncontrol = "ipc:///a"\n[manager\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        control_endpoint_of(path)
