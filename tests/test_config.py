"""Config loading: files, search order, the default config, round trips, `devmgr validate`,
and property tests (valid specs survive JSON; junk only ever raises ConfigError)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import zmq.auth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmgr._config import (
    default_config,
    find_config,
    load_config,
    parse_config,
    parse_device,
    parse_devices_file,
    resolve_config,
)
from devmgr._errors import ConfigError
from devmgr._spec import KIND_SOCKET_TYPES, DeviceSpec, ManagerConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.toml"))
PLAIN_EXAMPLES = [p for p in EXAMPLES if p.name != "curve-control.toml"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def make_keys(folder: Path) -> None:
    """Create the CURVE certificates the curve example expects beside it."""
    keys = folder / "keys"
    (keys / "authorized").mkdir(parents=True)
    _, secret = zmq.auth.create_certificates(str(keys), "manager")
    os.chmod(secret, 0o600)  # zmq.auth writes it 0644, which devmgr refuses
    zmq.auth.create_certificates(str(keys / "authorized"), "operator")


# ---------------------------------------------------------------- examples and defaults


@pytest.mark.parametrize("path", PLAIN_EXAMPLES, ids=[p.name for p in PLAIN_EXAMPLES])
def test_example_loads_and_round_trips(path: Path) -> None:
    config = load_config(path)
    assert config.path == path and config.devices
    again = ManagerConfig.model_validate_json(config.model_dump_json())
    assert again == config
    # TOML -> model -> JSON -> model, device by device through the `add` path
    for name, spec in config.devices.items():
        data = json.loads(spec.model_dump_json())
        assert parse_device(data, name=name) == spec


def test_curve_example_with_keys(tmp_path: Path) -> None:
    example = ROOT / "deploy" / "examples" / "curve-control.toml"
    copy = write(tmp_path / "devmgr.toml", example.read_text())
    with pytest.raises(ConfigError) as caught:
        load_config(copy)
    assert [p.where for p in caught.value.problems] == [
        "manager.curve.secret_key",
        "manager.curve.authorized_keys",
    ]
    make_keys(tmp_path)
    config = load_config(copy)
    assert config.manager.curve is not None
    assert config.manager.curve.secret_key == tmp_path / "keys" / "manager.key_secret"
    assert config.manager.curve.authorized_keys == tmp_path / "keys" / "authorized"
    # a public certificate is not a secret one
    public = write(tmp_path / "p.toml", copy.read_text().replace("key_secret", "key"))
    with pytest.raises(ConfigError, match="holds no secret key"):
        load_config(public)


def test_default_config() -> None:
    config = default_config()
    assert config.path is None and list(config.devices) == ["default"]
    spec = config.devices["default"]
    assert spec.kind == "monitored_queue"
    assert (spec.in_.type, spec.in_.bind) == ("ROUTER", ("tcp://127.0.0.1:5559",))
    assert (spec.out.type, spec.out.bind) == ("DEALER", ("tcp://127.0.0.1:5560",))
    assert spec.mon is not None and (spec.mon.type, spec.mon.bind) == (
        "PUB",
        ("tcp://127.0.0.1:5561",),
    )


def test_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEVMGR_CONFIG", raising=False)
    assert find_config(None) is None
    assert resolve_config(None) == default_config()
    local = write(tmp_path / "devmgr.toml", "[manager]\nstop_timeout = 1.0\n")
    assert find_config(None) == Path("devmgr.toml")
    assert resolve_config(None).manager.stop_timeout == 1.0
    env = write(tmp_path / "env.toml", "[manager]\nstop_timeout = 2.0\n")
    monkeypatch.setenv("DEVMGR_CONFIG", str(env))
    assert find_config(None) == env
    assert find_config(str(local)) == local
    assert resolve_config(str(local)).manager.stop_timeout == 1.0


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = write(
        folder / "devmgr.toml",
        '[manager]\ncontrol = "ipc://run/control"\n'
        '[devices.a]\nin = { type = "PULL", bind = ["ipc://run/a-in"] }\n'
        'out = { type = "PUSH", connect = ["ipc://@abstract", "ipc:///abs/b"] }\n',
    )
    config = load_config(path)
    assert config.manager.control == f"ipc://{folder}/run/control"
    assert config.manager.events == f"ipc://{folder}/run/events"
    assert config.devices["a"].in_.bind == (f"ipc://{folder}/run/a-in",)
    assert config.devices["a"].out.connect == ("ipc://@abstract", "ipc:///abs/b")


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "devmgr.toml", "[manager]\nstop_timeout = 1.0\n[devices.a\nx = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert "line 3, column 11" in problem.message and "invalid TOML" in problem.message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_parse_device_places_problems_under_its_name() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_device(
            {"name": "x", "in": {"type": "ROUTR", "bind": ["tcp://127.0.0.1:1"]}, "out": 5}
        )
    assert [p.where for p in caught.value.problems] == ["devices.x.in.type", "devices.x.out"]
    with pytest.raises(ConfigError) as caught:
        parse_device({"in": {}, "out": {}})
    assert "name" in [p.where for p in caught.value.problems]
    with pytest.raises(ConfigError, match="differs"):
        parse_device({"name": "a", "in": {}, "out": {}}, name="b")


def test_parse_devices_file(tmp_path: Path) -> None:
    good = write(
        tmp_path / "add.toml",
        '[devices.a]\nkind = "streamer"\nin = { type = "PULL", bind = ["ipc://a-in"] }\n'
        'out = { type = "PUSH", bind = ["ipc://a-out"] }\n'
        '[devices.b]\nkind = "queue"\nin = { type = "ROUTER", bind = ["ipc://b-in"] }\n'
        'out = { type = "DEALER", bind = ["ipc://b-out"] }\n',
    )
    specs = parse_devices_file(good)
    assert [s.name for s in specs] == ["a", "b"]
    assert specs[0].in_.bind == (f"ipc://{tmp_path}/a-in",)
    clash = write(tmp_path / "clash.toml", good.read_text().replace("b-in", "a-in"))
    with pytest.raises(ConfigError) as caught:
        parse_devices_file(clash)
    assert [p.where for p in caught.value.problems] == ["devices.b.in.bind[0]"]
    extra = write(tmp_path / "extra.toml", "[manager]\n" + good.read_text())
    with pytest.raises(ConfigError) as caught:
        parse_devices_file(extra)
    assert [p.where for p in caught.value.problems] == ["manager"]


# ---------------------------------------------------------------- devmgr validate


def run_validate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DEVMGR_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "devmgr", "validate", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=env,
        check=False,
    )


def test_validate_command(tmp_path: Path) -> None:
    example = ROOT / "deploy" / "examples" / "queue.toml"
    ok = run_validate("-c", str(example))
    assert (ok.returncode, ok.stdout) == (0, f"ok: 2 devices in {example}\n"), ok.stderr
    broken = write(
        tmp_path / "broken.toml",
        '[devices.a]\nin = { type = "ROUTR", bind = ["tcp://127.0.0.1:5559"] }\n'
        'out = { type = "DEALER", bind = ["inproc://x"] }\n'
        "restart = { window = 0 }\n",
    )
    bad = run_validate("-c", str(broken))
    assert bad.returncode == 2
    lines = bad.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [
        "devices.a.in.type",
        "devices.a.out.bind[0]",
        "devices.a.restart.window",
    ]
    assert "did you mean ROUTER?" in lines[0]
    # no -c: ./devmgr.toml, else the embedded default
    assert run_validate(cwd=tmp_path).stdout == (
        "ok: 1 device in the embedded default config (no -c FILE, $DEVMGR_CONFIG or "
        "./devmgr.toml)\n"
    )
    write(tmp_path / "devmgr.toml", broken.read_text())
    assert run_validate(cwd=tmp_path).returncode == 2


# ---------------------------------------------------------------- property tests

ports = st.integers(min_value=1024, max_value=65535)


@st.composite
def device_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Draw a valid device table (as JSON from `add`), with distinct bound ports."""
    kind = draw(st.sampled_from(sorted(KIND_SOCKET_TYPES)))
    allowed = KIND_SOCKET_TYPES[kind]
    chosen = draw(st.lists(ports, min_size=3, max_size=3, unique=True))
    text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)

    def socket(side: str, port: int) -> dict[str, Any]:
        type_ = draw(st.sampled_from(allowed[side]))
        options: dict[str, Any] = {}
        if draw(st.booleans()):
            options["sndhwm"] = draw(st.integers(0, 2**31 - 1))
        if draw(st.booleans()):
            options["linger"] = draw(st.integers(-1, 10_000))
        if type_ == "SUB" and draw(st.booleans()):
            options["subscribe"] = draw(st.lists(st.text(max_size=5), min_size=1, max_size=3))
        if type_ in ("ROUTER", "DEALER") and draw(st.booleans()):
            options["routing_id"] = draw(text)
        where = draw(st.sampled_from(["bind", "connect"]))
        host = "127.0.0.1" if where == "bind" else draw(st.sampled_from(["127.0.0.1", "h.lan"]))
        return {
            "type": draw(st.sampled_from([type_, type_.lower()])),
            where: [f"tcp://{host}:{port}"],
            "options": options,
        }

    table: dict[str, Any] = {
        "name": draw(st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)),
        "kind": kind,
        "in": socket("in", chosen[0]),
        "out": socket("out", chosen[1]),
        "autostart": draw(st.booleans()),
        "restart": {
            "policy": draw(st.sampled_from(["always", "on-failure", "never"])),
            "backoff_initial": draw(st.floats(0, 10)),
            "backoff_max": draw(st.floats(10, 100)),
            "max_restarts": draw(st.integers(0, 100)),
            "window": draw(st.floats(0.001, 1000)),
        },
        "health": {"max_rss_mb": draw(st.none() | st.floats(1, 4096))},
    }
    if kind == "monitored_queue":
        table["in_prefix"] = draw(text)
        table["out_prefix"] = draw(text)
        if draw(st.booleans()):
            table["mon"] = socket("mon", chosen[2])
    return table


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(device_specs())
def test_valid_spec_survives_json_round_trip(table: dict[str, Any]) -> None:
    spec = parse_device(table)
    text = spec.model_dump_json()
    assert DeviceSpec.model_validate_json(text) == spec
    assert parse_device(json.loads(text)) == spec
    assert parse_config({"devices": {spec.name: json.loads(text)}}).devices[spec.name] == spec


KEYS = [
    "manager", "devices", "control", "events", "health_interval", "stop_timeout", "curve",
    "secret_key", "authorized_keys", "metrics", "name", "kind", "in", "out", "mon", "type",
    "bind", "connect", "options", "in_prefix", "out_prefix", "autostart", "restart", "health",
    "policy", "backoff_initial", "backoff_max", "max_restarts", "window", "max_rss_mb",
    "ping_timeout", "sndhwm", "subscribe", "routing_id", "linger", "ipv6",
]  # fmt: skip
# JSON from a control request may carry lone surrogates: include them.
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | any_text
    | any_text.map(lambda t: "tcp://" + t)
    | any_text.map(lambda t: "ipc://" + t)
    | st.sampled_from(["ROUTER", "SUB", "queue", "tcp://127.0.0.1:1", "ipc://x", "tcp://*:1"])
)
junk = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk, st.sampled_from(["top", "manager", "device", "socket", "add"]))
def test_junk_only_raises_config_error(value: object, where: str) -> None:
    socket = {"type": "ROUTER", "bind": ["tcp://127.0.0.1:1"]}
    data: object = {
        "top": value,
        "manager": {"manager": value},
        "device": {"devices": {"a": value}},
        "socket": {"devices": {"a": {"in": value, "out": socket}}},
        "add": value,
    }[where]
    try:
        if where == "add":
            parse_device(data, name="a")
        else:
            parse_config(data)
    except ConfigError as exc:
        assert exc.problems
        # every problem prints as one line of UTF-8
        for problem in exc.problems:
            str(problem).encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_junk_files_only_raise_config_error(raw: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".toml") as handle:
        handle.write(raw)
        handle.flush()
        try:
            load_config(handle.name)
        except ConfigError:
            pass


def test_toml_example_equals_json_form() -> None:
    path = ROOT / "deploy" / "examples" / "forwarder.toml"
    data = tomllib.loads(path.read_text())
    assert parse_config(json.loads(json.dumps(data)), path=path) == load_config(path)


def test_default_endpoints_are_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/tmp/" + "d" * 100)
    with pytest.raises(ConfigError) as caught:
        default_config()
    assert [p.where for p in caught.value.problems] == ["manager.control", "manager.events"]
    assert "sun_path" in caught.value.problems[0].message
