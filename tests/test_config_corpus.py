"""A corpus of bad configs: each names exactly one place, and nothing else is reported."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devmgr._config import parse_config
from devmgr._errors import ConfigError

IN = 'in = { type = "ROUTER", bind = ["tcp://127.0.0.1:5559"] }'
OUT = 'out = { type = "DEALER", bind = ["tcp://127.0.0.1:5560"] }'


def device(*lines: str, name: str = "a", kind: str | None = None, inn: str = IN, out: str = OUT):
    """Return a [devices.NAME] table in TOML; `inn`/`out` replace the sockets ('' drops)."""
    head = [f"[devices.{name}]"] + ([f'kind = "{kind}"'] if kind else [])
    body = [line for line in (inn, out, *lines) if line]
    return "\n".join(head + body) + "\n"


def sock(side: str, type_: str, *, bind: str = "", connect: str = "", options: str = "") -> str:
    """Return one socket line, e.g. sock('in', 'SUB', bind='"tcp://127.0.0.1:1"')."""
    parts = [f'type = "{type_}"']
    if bind:
        parts.append(f"bind = [{bind}]")
    if connect:
        parts.append(f"connect = [{connect}]")
    if options:
        parts.append(f"options = {{ {options} }}")
    return f"{side} = {{ {', '.join(parts)} }}"


TCP_MANAGER = (
    '[manager]\ncontrol = "tcp://127.0.0.1:7000"\nevents = "tcp://127.0.0.1:7001"\n'
    "insecure_tcp_control = true\n"
)
LONG_IPC = '"ipc:///tmp/' + "x" * 110 + '"'


@dataclass
class Case:
    id: str
    config: str | dict[str, Any]
    where: str
    says: str = ""  # a piece of the message that must be there


CASES = [
    # unknown keys, with a did-you-mean
    Case("top-typo", "[manger]\nx = 1\n", "manger", "did you mean manager?"),
    Case(
        "manager-key",
        "[manager]\nhelth_interval = 1.0\n",
        "manager.helth_interval",
        "did you mean health_interval?",
    ),
    Case(
        "device-key", device("autostrat = true"), "devices.a.autostrat", "did you mean autostart?"
    ),
    Case(
        "socket-key",
        device(inn='in = { type = "ROUTER", bnd = ["tcp://127.0.0.1:5559"] }'),
        "devices.a.in.bnd",
        "did you mean bind?",
    ),
    Case(
        "restart-key",
        device("restart = { polcy = 'never' }"),
        "devices.a.restart.polcy",
        "did you mean policy?",
    ),
    Case(
        "health-key",
        device("health = { max_rss = 5 }"),
        "devices.a.health.max_rss",
        "did you mean max_rss_mb?",
    ),
    Case(
        "curve-key",
        "[manager.curve]\nsecret = 'x'\nauthorized_keys = '.'\nsecret_key = 'k'\n",
        "manager.curve.secret",
        "unknown key",
    ),
    # wrong types, missing fields
    Case(
        "autostart-string",
        device('autostart = "yes"'),
        "devices.a.autostart",
        "expected true or false",
    ),
    Case(
        "bind-string",
        device(inn='in = { type = "ROUTER", bind = "tcp://127.0.0.1:5559" }'),
        "devices.a.in.bind",
        "expected a list",
    ),
    Case("missing-in", device(inn=""), "devices.a.in", "required"),
    Case(
        "missing-type",
        device(out='out = { bind = ["tcp://127.0.0.1:5560"] }'),
        "devices.a.out.type",
        "required",
    ),
    Case("devices-not-table", "devices = 3\n", "devices", "expected [devices.NAME] tables"),
    Case(
        "options-not-table",
        device(
            sock("in", "ROUTER", bind='"tcp://127.0.0.1:1"', options="").replace(
                "}", ", options = 5 }"
            ),
            inn="",
        ),
        "devices.a.in.options",
        "expected a table",
    ),
    Case(
        "max-restarts-float",
        device("restart = { max_restarts = 1.5 }"),
        "devices.a.restart.max_restarts",
        "expected an integer",
    ),
    Case("name-differs", device('name = "b"'), "devices.a.name", "differs"),
    Case("bad-name", device(name='"bad name"'), "devices.bad name.name", "not a device name"),
    # socket types and kinds
    Case(
        "type-typo",
        device(inn=sock("in", "ROUTR", bind='"tcp://127.0.0.1:5559"')),
        "devices.a.in.type",
        "'ROUTR' is not a ZeroMQ socket type (did you mean ROUTER?)",
    ),
    Case(
        "type-draft",
        device(inn=sock("in", "SERVER", bind='"tcp://127.0.0.1:5559"')),
        "devices.a.in.type",
        "draft",
    ),
    Case("kind-typo", device(kind="queu"), "devices.a.kind", "did you mean queue?"),
    Case(
        "queue-in-dealer",
        device(kind="queue", inn=sock("in", "DEALER", bind='"tcp://127.0.0.1:5559"')),
        "devices.a.in.type",
        "must be ROUTER",
    ),
    Case(
        "forwarder-out-push",
        device(
            kind="forwarder",
            inn=sock("in", "XSUB", bind='"tcp://127.0.0.1:5559"'),
            out=sock("out", "PUSH", bind='"tcp://127.0.0.1:5560"'),
        ),
        "devices.a.out.type",
        "must be PUB or XPUB",
    ),
    Case(
        "streamer-in-push",
        device(
            kind="streamer",
            inn=sock("in", "PUSH", bind='"tcp://127.0.0.1:5559"'),
            out=sock("out", "PUSH", bind='"tcp://127.0.0.1:5560"'),
        ),
        "devices.a.in.type",
        "streamer: in PULL, out PUSH",
    ),
    Case(
        "mq-in-req",
        device(inn=sock("in", "REQ", bind='"tcp://127.0.0.1:5559"')),
        "devices.a.in.type",
        "must be ROUTER, DEALER",
    ),
    Case(
        "mon-sub",
        device(sock("mon", "SUB", bind='"tcp://127.0.0.1:5561"')),
        "devices.a.mon.type",
        "PUB, XPUB, PUSH, DEALER or PAIR",
    ),
    Case(
        "mon-on-queue",
        device(sock("mon", "PUB", bind='"tcp://127.0.0.1:5561"'), kind="queue"),
        "devices.a.mon",
        "only a monitored_queue has mon",
    ),
    Case(
        "prefix-on-streamer",
        device(
            'in_prefix = "x"',
            kind="streamer",
            inn=sock("in", "PULL", bind='"tcp://127.0.0.1:5559"'),
            out=sock("out", "PUSH", bind='"tcp://127.0.0.1:5560"'),
        ),
        "devices.a.in_prefix",
        "only a monitored_queue",
    ),
    Case("prefix-empty", device('out_prefix = ""'), "devices.a.out_prefix", "empty"),
    Case(
        "prefix-surrogate",
        {
            "devices": {
                "a": {
                    "in": {"type": "ROUTER", "bind": ["tcp://127.0.0.1:5559"]},
                    "out": {"type": "DEALER", "bind": ["tcp://127.0.0.1:5560"]},
                    "in_prefix": "\ud800",
                }
            }
        },
        "devices.a.in_prefix",
        "UTF-8",
    ),
    # endpoints
    Case(
        "endpoint-no-transport",
        device(inn=sock("in", "ROUTER", bind='"127.0.0.1:5559"')),
        "devices.a.in.bind[0]",
        "TRANSPORT://ADDRESS",
    ),
    Case(
        "endpoint-transport",
        device(inn=sock("in", "ROUTER", bind='"tpc://127.0.0.1:5559"')),
        "devices.a.in.bind[0]",
        "did you mean tcp?",
    ),
    Case(
        "endpoint-inproc",
        device(inn=sock("in", "ROUTER", bind='"inproc://orders"')),
        "devices.a.in.bind[0]",
        "own",
    ),
    Case(
        "endpoint-ipc-long",
        device(inn=sock("in", "ROUTER", bind=LONG_IPC)),
        "devices.a.in.bind[0]",
        "107",
    ),
    Case(
        "endpoint-port-range",
        device(inn=sock("in", "ROUTER", bind='"tcp://127.0.0.1:70000"')),
        "devices.a.in.bind[0]",
        "out of range",
    ),
    Case(
        "endpoint-port-nan",
        device(inn=sock("in", "ROUTER", bind='"tcp://127.0.0.1:http"')),
        "devices.a.in.bind[0]",
        "not a number",
    ),
    Case(
        "endpoint-no-port",
        device(inn=sock("in", "ROUTER", bind='"tcp://127.0.0.1"')),
        "devices.a.in.bind[0]",
        "no port",
    ),
    Case(
        "connect-star",
        device(inn=sock("in", "ROUTER", connect='"tcp://*:5559"')),
        "devices.a.in.connect[0]",
        "only for bind",
    ),
    Case(
        "connect-port-0",
        device(inn=sock("in", "ROUTER", connect='"tcp://127.0.0.1:0"')),
        "devices.a.in.connect[0]",
        "only makes sense for bind",
    ),
    Case(
        "connect-ipc-star",
        device(inn=sock("in", "ROUTER", connect='"ipc://*"')),
        "devices.a.in.connect[0]",
        "only for bind",
    ),
    Case(
        "bind-hostname",
        device(inn=sock("in", "ROUTER", bind='"tcp://example.com:5559"')),
        "devices.a.in.bind[0]",
        "does not look up host names",
    ),
    Case(
        "bind-source",
        device(inn=sock("in", "ROUTER", bind='"tcp://127.0.0.1:0;127.0.0.1:5559"')),
        "devices.a.in.bind[0]",
        "only for connect",
    ),
    Case(
        "ipv6-brackets",
        device(inn=sock("in", "ROUTER", bind='"tcp://::1:5559"')),
        "devices.a.in.bind[0]",
        "brackets",
    ),
    Case(
        "ipv6-option",
        device(inn=sock("in", "ROUTER", bind='"tcp://[::1]:5559"')),
        "devices.a.in.bind[0]",
        "ipv6 = true",
    ),
    Case(
        "no-endpoints",
        device(out='out = { type = "DEALER" }'),
        "devices.a.out",
        "neither bind nor connect",
    ),
    # endpoints bound twice
    Case(
        "dup-across-devices",
        device()
        + device(
            name="b",
            inn=sock("in", "ROUTER", bind='"tcp://127.0.0.1:5559"'),
            out=sock("out", "DEALER", bind='"tcp://127.0.0.1:6000"'),
        ),
        "devices.b.in.bind[0]",
        "also bound at devices.a.in.bind[0]",
    ),
    Case(
        "dup-wildcard",
        device()
        + device(
            name="b",
            inn=sock("in", "ROUTER", bind='"tcp://127.0.0.1:6000"'),
            out=sock("out", "DEALER", bind='"tcp://*:5560"'),
        ),
        "devices.b.out.bind[0]",
        "is also bound, as tcp://127.0.0.1:5560, at devices.a.out.bind[0]",
    ),
    Case(
        "dup-manager-control",
        TCP_MANAGER + device(inn=sock("in", "ROUTER", bind='"tcp://127.0.0.1:7000"')),
        "devices.a.in.bind[0]",
        "manager.control",
    ),
    Case(
        "dup-in-one-device",
        device(sock("mon", "PUB", bind='"tcp://127.0.0.1:5559"')),
        "devices.a.mon.bind[0]",
        "devices.a.in.bind[0]",
    ),
    Case(
        "dup-in-one-socket",
        device(inn=sock("in", "ROUTER", bind='"ipc:///tmp/x", "ipc:///tmp/x"')),
        "devices.a.in.bind[1]",
        "also bound",
    ),
    Case(
        "dup-control-events",
        '[manager]\ncontrol = "ipc:///tmp/dm/c"\nevents = "ipc:///tmp/dm/c"\n',
        "manager.events",
        "also bound at manager.control",
    ),
    # socket options
    Case(
        "option-unknown",
        device(out=sock("out", "DEALER", bind='"tcp://127.0.0.1:5560"', options="sndhwmm = 5")),
        "devices.a.out.options.sndhwmm",
        "did you mean sndhwm?",
    ),
    Case(
        "option-type",
        device(out=sock("out", "DEALER", bind='"tcp://127.0.0.1:5560"', options='sndhwm = "lots"')),
        "devices.a.out.options.sndhwm",
        "integer",
    ),
    Case(
        "option-range",
        device(out=sock("out", "DEALER", bind='"tcp://127.0.0.1:5560"', options="linger = -5")),
        "devices.a.out.options.linger",
        "at least -1",
    ),
    Case(
        "option-bool",
        device(out=sock("out", "DEALER", bind='"tcp://127.0.0.1:5560"', options="immediate = 2")),
        "devices.a.out.options.immediate",
        "true or false",
    ),
    Case(
        "option-socket-type",
        device(out=sock("out", "DEALER", bind='"tcp://127.0.0.1:5560"', options='subscribe = "x"')),
        "devices.a.out.options.subscribe",
        "only to SUB",
    ),
    Case(
        "option-bytes-long",
        device(
            inn=sock(
                "in", "ROUTER", bind='"tcp://127.0.0.1:5559"', options=f'routing_id = "{"r" * 256}"'
            )
        ),
        "devices.a.in.options.routing_id",
        "255",
    ),
    Case(
        "option-bytes-int",
        device(inn=sock("in", "ROUTER", bind='"tcp://127.0.0.1:5559"', options="routing_id = 5")),
        "devices.a.in.options.routing_id",
        "a string",
    ),
    Case(
        "option-read-only",
        device(inn=sock("in", "ROUTER", bind='"tcp://127.0.0.1:5559"', options="type = 5")),
        "devices.a.in.options.type",
        "read-only",
    ),
    Case(
        "option-hwm",
        device(inn=sock("in", "ROUTER", bind='"tcp://127.0.0.1:5559"', options="hwm = 5")),
        "devices.a.in.options.hwm",
        "sndhwm and rcvhwm",
    ),
    Case(
        "option-empty-subscribe",
        device(
            kind="forwarder",
            inn=sock("in", "SUB", bind='"tcp://127.0.0.1:5559"', options="subscribe = []"),
            out=sock("out", "PUB", bind='"tcp://127.0.0.1:5560"'),
        ),
        "devices.a.in.options.subscribe",
        "for every topic",
    ),
    # restart and health numbers
    Case(
        "backoff-negative",
        device("restart = { backoff_initial = -1.0 }"),
        "devices.a.restart.backoff_initial",
        "at least 0",
    ),
    Case(
        "backoff-order",
        device("restart = { backoff_initial = 5.0, backoff_max = 1.0 }"),
        "devices.a.restart.backoff_max",
        "at least backoff_initial",
    ),
    Case(
        "window-zero",
        device("restart = { window = 0 }"),
        "devices.a.restart.window",
        "greater than 0",
    ),
    Case(
        "max-restarts-negative",
        device("restart = { max_restarts = -1 }"),
        "devices.a.restart.max_restarts",
        "0 or more",
    ),
    Case(
        "policy-typo",
        device('restart = { policy = "on_failure" }'),
        "devices.a.restart.policy",
        "did you mean on-failure?",
    ),
    Case(
        "ping-timeout-zero",
        device("health = { ping_timeout = 0.0 }"),
        "devices.a.health.ping_timeout",
        "greater than 0",
    ),
    Case(
        "rss-negative",
        device("health = { max_rss_mb = -5 }"),
        "devices.a.health.max_rss_mb",
        "greater than 0",
    ),
    Case("interval-nan", "[manager]\nhealth_interval = nan\n", "manager.health_interval", "finite"),
    Case(
        "stop-timeout-negative",
        "[manager]\nstop_timeout = -1\n",
        "manager.stop_timeout",
        "at least 0",
    ),
    # the manager's endpoints and security
    Case(
        "control-public",
        '[manager]\ncontrol = "tcp://0.0.0.0:7000"\nevents = "tcp://127.0.0.1:7001"\n',
        "manager.control",
        "[manager.curve]",
    ),
    Case(
        "control-loopback-no-curve",
        '[manager]\ncontrol = "tcp://127.0.0.1:7000"\nevents = "tcp://127.0.0.1:7001"\n',
        "manager.control",
        "insecure_tcp_control",
    ),
    Case(
        "control-localhost-no-curve",
        '[manager]\ncontrol = "tcp://localhost:7000"\nevents = "tcp://127.0.0.1:7001"\n',
        "manager.control",
        "every user of this machine",
    ),
    Case(
        "control-public-opt-out-is-not-enough",
        '[manager]\ncontrol = "tcp://0.0.0.0:7000"\nevents = "tcp://127.0.0.1:7001"\n'
        "insecure_tcp_control = true\n",
        "manager.control",
        "[manager.curve]",
    ),
    Case(
        "control-tcp-no-events",
        '[manager]\ncontrol = "tcp://127.0.0.1:7000"\ninsecure_tcp_control = true\n',
        "manager.events",
        "required when control is tcp",
    ),
    Case(
        "control-inproc", '[manager]\ncontrol = "inproc://control"\n', "manager.control", "inproc"
    ),
    Case(
        "control-random-port",
        '[manager]\ncontrol = "tcp://127.0.0.1:*"\nevents = "tcp://127.0.0.1:7001"\n'
        "insecure_tcp_control = true\n",
        "manager.control",
        "could not find",
    ),
    Case(
        "curve-missing-files",
        '[manager]\ncontrol = "tcp://0.0.0.0:7000"\n'
        'events = "tcp://0.0.0.0:7001"\n[manager.curve]\nsecret_key = "keys/m.key_secret"\n'
        'authorized_keys = "."\n',
        "manager.curve.secret_key",
        "does not exist",
    ),
    Case("metrics-form", '[manager]\nmetrics = "9100"\n', "manager.metrics", "HOST:PORT"),
]


def test_corpus_is_large_and_distinct() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_config_names_its_one_place(case: Case, tmp_path: Path) -> None:
    data = tomllib.loads(case.config) if isinstance(case.config, str) else case.config
    with pytest.raises(ConfigError) as caught:
        parse_config(data, path=tmp_path / "devmgr.toml")
    problems = caught.value.problems
    assert [p.where for p in problems] == [case.where], problems
    assert case.says in problems[0].message, problems[0]
    # each problem is one line: the CLI prints one per line
    assert "\n" not in str(problems[0])


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    bad = (
        "[manger]\n"
        + device(kind="queu")
        + device(name="b", inn=sock("in", "ROUTR", bind='"tcp://127.0.0.1:7000"'))
        + device(name="c", out=sock("out", "DEALER", bind='"inproc://x"'))
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(bad), path=tmp_path / "devmgr.toml")
    assert [p.where for p in caught.value.problems] == [
        "manger",
        "devices.a.kind",
        "devices.b.in.type",
        "devices.c.out.bind[0]",
    ]
