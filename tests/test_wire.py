"""Each wire fact is defined once (devmgr._wire); what repeats it elsewhere is pinned here.

The Cython core writes the STATISTICS reply in C: a real loop, driven with a different
count and size in each direction, must fill every frame where STAT_KEYS says it is.
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path
from typing import Any, get_args

import zmq

from devmgr import _core, _metrics, _protocol, _wire
from devmgr._wire import STAT_KEYS, STATS_FRAME, parse_stats

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "devmgr"


def test_the_stats_model_and_the_metrics_follow_stat_keys() -> None:
    assert tuple(_protocol.Stats.model_fields) == STAT_KEYS
    labels = {(side, direction) for side, direction in _metrics._STAT_LABELS.values()}
    assert labels == {("in", "received"), ("in", "sent"), ("out", "received"), ("out", "sent")}
    for key in _metrics._STAT_LABELS:
        assert key.replace("_msgs_", "_bytes_") in STAT_KEYS


def test_models_take_states_reasons_codes_and_version_from_the_wire_module() -> None:
    schema = _protocol.StatusResult.model_json_schema()
    assert schema["$defs"]["State"]["enum"] == [s.value for s in _wire.State]
    assert schema["$defs"]["Reason"]["enum"] == [r.value for r in _wire.Reason]
    error = _protocol.ErrorReply.model_json_schema()
    assert error["$defs"]["ErrorBody"]["properties"]["code"]["enum"] == list(_wire.ERROR_CODES)
    assert get_args(_wire.ProtocolVersion) == (_wire.PROTOCOL_VERSION,)
    assert tuple(s.value for s in _wire.State) == _metrics.STATES
    assert tuple(r.value for r in _wire.Reason) == _metrics.EXIT_REASONS


def test_no_module_writes_a_wire_fact_down_again() -> None:
    """Outside _wire, no module assigns the protocol version or the CLI's exit statuses."""
    facts = {"PROTOCOL_VERSION", "MAX_REQUEST_BYTES", "STAT_KEYS", "ERROR_CODES"}
    facts |= {name for name in vars(_wire) if name.startswith("EXIT_")}
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_wire.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                offenders += [
                    f"{path.name}:{node.lineno} {el.id}"
                    for el in elements
                    if isinstance(el, ast.Name) and el.id in facts
                ]
    assert not offenders, offenders


def _statistics(ctrl: zmq.Socket[Any]) -> list[bytes]:
    ctrl.send(b"STATISTICS")
    assert ctrl.poll(5000), "no STATISTICS reply"
    return ctrl.recv_multipart()


def test_the_core_fills_each_statistics_frame_where_stat_keys_says() -> None:
    ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context()
    sockets: list[zmq.Socket[Any]] = []

    def socket(kind: int, endpoint: str, bind: bool) -> zmq.Socket[Any]:
        sock = ctx.socket(kind)
        sock.linger = 0
        sock.rcvtimeo = sock.sndtimeo = 5000
        (sock.bind if bind else sock.connect)(endpoint)
        sockets.append(sock)
        return sock

    dev_in, peer_in = socket(zmq.PAIR, "inproc://in", True), socket(zmq.PAIR, "inproc://in", False)
    dev_out = socket(zmq.PAIR, "inproc://out", True)
    peer_out = socket(zmq.PAIR, "inproc://out", False)
    ctrl, ctrl_peer = socket(zmq.PAIR, "inproc://c", True), socket(zmq.PAIR, "inproc://c", False)
    loop = threading.Thread(target=_core.proxy, args=(dev_in, dev_out, None, ctrl), daemon=True)
    loop.start()
    try:
        # in -> out: 3 messages of 2 frames of 5 bytes; out -> in: 2 messages of 7 bytes.
        for _ in range(3):
            peer_in.send_multipart([b"a" * 5, b"b" * 5])
        for _ in range(3):
            assert peer_out.recv_multipart() == [b"a" * 5, b"b" * 5]
        for _ in range(2):
            peer_out.send(b"c" * 7)
        for _ in range(2):
            assert peer_in.recv() == b"c" * 7
        frames = _statistics(ctrl_peer)
        assert len(frames) == len(STAT_KEYS)
        assert all(len(frame) == STATS_FRAME.size for frame in frames)
        assert [STATS_FRAME.unpack(frame)[0] for frame in frames] == [3, 30, 2, 14, 2, 14, 3, 30]
        assert parse_stats(frames) == {
            "in_msgs_received": 3,
            "in_bytes_received": 30,
            "in_msgs_sent": 2,
            "in_bytes_sent": 14,
            "out_msgs_received": 2,
            "out_bytes_received": 14,
            "out_msgs_sent": 3,
            "out_bytes_sent": 30,
        }
        ctrl_peer.send(b"TERMINATE")
        assert ctrl_peer.recv() == b"OK"
        loop.join(5)
        assert not loop.is_alive()
    finally:
        for sock in sockets:
            sock.close(linger=0)
        ctx.term()
