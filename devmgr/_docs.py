"""Generate the reference sections of docs/ from the definitions they describe.

docs/*.md (and README.md) are prose written by hand, with generated blocks between
``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``: the config keys
(from the pydantic spec), the control commands, error codes, states, exit reasons and
status fields (from `_protocol` and `_wire`), the STATISTICS frames, the events, and
every CLI subcommand and option (from the argparse parser itself). Run
`python -m devmgr._docs` after changing any of them; tests/test_docs.py fails while a
block differs from what this module generates (`--check` only compares).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from devmgr import _protocol, _spec, _wire

REGENERATE = "python -m devmgr._docs"
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(
    r"(<!-- BEGIN generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)"
    r"(<!-- END generated: (?P=name) -->)",
    re.DOTALL,
)
_CLIENT_OPTIONS = ("config", "endpoint", "timeout", "curve_client", "curve_server")


def _table(header: tuple[str, ...], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- types and defaults, from the JSON Schema pydantic makes of a model ---------------


def _type(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    """Say what a JSON Schema admits, in a few words."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        target = defs[name]
        if "enum" in target:
            return " | ".join(json.dumps(v) for v in target["enum"])
        return {"SocketSpec": "socket table"}.get(name, "table" if "properties" in target else name)
    if "anyOf" in schema:
        kinds = [_type(s, defs) for s in schema["anyOf"] if s.get("type") != "null"]
        nullable = any(s.get("type") == "null" for s in schema["anyOf"])
        return " or ".join(dict.fromkeys(kinds)) + (" or null" if nullable else "")
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items") or (schema.get("prefixItems") or [{}])[0]
        return f"list of {_type(items, defs)}" if items else "list"
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            return f"table of {_type(extra, defs)}"
        return "table"
    names = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}
    return names.get(str(kind), "any")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    factory = field.default_factory
    if factory is not None:
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            return "its defaults"
        if isinstance(factory, type):
            return f"`{json.dumps(factory())}`"
        return "see meaning"
    default = field.default
    if default is None or default is PydanticUndefined:
        return "not set"
    if isinstance(default, tuple):
        default = list(default)
    return f"`{json.dumps(default)}`"


def _fields(
    model: type[BaseModel], *, skip: tuple[str, ...] = (), defaults: bool = True
) -> list[tuple[str, ...]]:
    """One row per field: key, type, (default,) meaning. With `defaults`, a TOML table."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.get("$defs", {})
    rows: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key in skip:
            continue
        kind = _type(schema["properties"][key], defs)
        if defaults:  # TOML has no null: an optional key is one left out
            kind = kind.removesuffix(" or null")
        description = field.description or ""
        nested = field.annotation
        if not description and isinstance(nested, type) and issubclass(nested, BaseModel):
            description = (nested.__doc__ or "").strip().splitlines()[0]
        row = (f"`{key}`", kind, _default(field), description) if defaults else None
        rows.append(row or (f"`{key}`", kind, description))
    return rows


# ---- blocks ---------------------------------------------------------------------------


def _config_section(model: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    return _table(("key", "type", "default", "meaning"), _fields(model, skip=skip))


def _commands() -> str:
    from devmgr._commands import COMMANDS

    rows = []
    for name, command in COMMANDS.items():
        schema = command.args.model_json_schema(by_alias=True)
        defs = schema.get("$defs", {})
        required = set(schema.get("required", ()))
        args = [
            f"`{key}` ({_type(sub, defs).replace('table', 'object')}"
            f"{'' if key in required else ', optional'}): {sub.get('description', '')}"
            for key, sub in schema.get("properties", {}).items()
        ]
        rows.append((f"`{name}`", "; ".join(args) or "none", command.does, command.result))
    return _table(("cmd", "args", "what it does", "result"), rows)


def _error_codes() -> str:
    if set(_wire.ERROR_MEANINGS) != set(_wire.ERROR_CODES):
        raise SystemExit("_wire.ERROR_MEANINGS must describe every code of ErrorCode")
    rows = [(f"`{code}`", _wire.ERROR_MEANINGS[code]) for code in _wire.ERROR_CODES]
    return _table(("code", "when"), rows)


def _states() -> str:
    rows = [(f"`{state.value}`", _wire.STATE_MEANINGS[state]) for state in _wire.State]
    return _table(("state", "meaning"), rows)


def _reasons() -> str:
    rows = [(f"`{reason.value}`", _wire.REASON_MEANINGS[reason]) for reason in _wire.Reason]
    return _table(("reason", "meaning"), rows)


def _result(model: type[BaseModel]) -> Callable[[], str]:
    return lambda: _table(("field", "type", "meaning"), _fields(model, defaults=False))


def _statistics() -> str:
    rows = []
    for index, key in enumerate(_wire.STAT_KEYS):
        side, unit, direction = key.split("_")
        what = {"msgs": "messages", "bytes": "bytes of the messages"}[unit]
        rows.append((str(index), f"`{key}`", f"{what} {direction} on the {side}-socket"))
    return _table(("frame", "`stats()` key", "counts"), rows)


def _events() -> str:
    topics = get_args(_protocol.EventTopic)
    if set(_protocol.EVENT_DOCS) != set(topics):
        raise SystemExit("_protocol.EVENT_DOCS must describe every topic of EventTopic")
    rows = []
    for topic in topics:
        when, fields = _protocol.EVENT_DOCS[topic]
        rows.append((f"`{topic}`", when, fields or "none"))
    return _table(("topic", "published when", "fields beyond event and at"), rows)


def _subcommands() -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    from devmgr._cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _option_rows(actions: list[argparse.Action]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for action in actions:
        if isinstance(action, argparse._HelpAction):
            continue
        takes_value = action.nargs != 0
        metavar = action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}"
            if action.choices
            else action.dest.upper()
        )
        shapes = {"*": f"[{metavar} ...]", "+": f"{metavar} [{metavar} ...]", "?": f"[{metavar}]"}
        value = shapes.get(str(action.nargs), str(metavar))
        if action.option_strings:
            form = ", ".join(action.option_strings) + (f" {value}" if takes_value else "")
        else:
            form = value
        default = action.default
        shown = (
            ""
            if default is None or default is False or default == argparse.SUPPRESS
            else f"`{' '.join(map(str, default)) if isinstance(default, list) else default}`"
        )
        rows.append((f"`{form}`", shown, action.help or ""))
    return rows


def _is_client(parser: argparse.ArgumentParser) -> bool:
    return set(_CLIENT_OPTIONS) <= {a.dest for a in parser._actions}


def _cli_commands() -> str:
    parts = []
    client_actions: list[argparse.Action] = []
    for name, help_text, sub in _subcommands():
        actions = sub._actions
        if _is_client(sub):
            client_actions = [a for a in actions if a.dest in _CLIENT_OPTIONS]
            actions = [a for a in actions if a.dest not in _CLIENT_OPTIONS]
        rows = _option_rows(actions)
        extra = " Takes the client options." if _is_client(sub) else ""
        parts.append(f"### `devmgr {name}`\n\n{help_text[:1].upper()}{help_text[1:]}.{extra}\n")
        if rows:
            parts.append("\n" + _table(("argument or option", "default", "meaning"), rows))
        parts.append("\n")
    head = "### Client options\n\nEvery command that talks to a running manager takes:\n\n"
    head += _table(("option", "default", "meaning"), _option_rows(client_actions)) + "\n"
    return (head + "".join(parts)).rstrip("\n") + "\n"


def _exit_statuses() -> str:
    rows = [(str(code), meaning) for code, meaning in _wire.EXIT_STATUSES.items()]
    return _table(("status", "meaning"), rows)


BLOCKS: dict[str, Callable[[], str]] = {
    "config-manager": lambda: _config_section(_spec.ManagerSettings),
    "config-curve": lambda: _config_section(_spec.CurveSpec),
    "config-device": lambda: _config_section(_spec.DeviceSpec, skip=("name",)),
    "config-socket": lambda: _config_section(_spec.SocketSpec),
    "config-restart": lambda: _config_section(_spec.RestartSpec),
    "config-health": lambda: _config_section(_spec.HealthSpec),
    "protocol-commands": _commands,
    "protocol-errors": _error_codes,
    "protocol-states": _states,
    "protocol-reasons": _reasons,
    "protocol-manager-status": _result(_protocol.ManagerStatus),
    "protocol-device-status": _result(_protocol.DeviceStatus),
    "protocol-last-exit": _result(_protocol.LastExit),
    "protocol-reload-result": _result(_protocol.ReloadResult),
    "protocol-logs-result": _result(_protocol.LogsResult),
    "protocol-log-line": _result(_protocol.LogLine),
    "protocol-statistics": _statistics,
    "event-topics": _events,
    "event-fields": _result(_protocol.Event),
    "cli-commands": _cli_commands,
    "cli-exit-statuses": _exit_statuses,
}


def render(text: str) -> str:
    """Return `text` with every generated block brought up to date."""

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise SystemExit(f"unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        return f"{match[1]}\n{BLOCKS[name]()}\n{match[4]}"

    return _BLOCK.sub(fill, text)


def _documents(directory: Path) -> list[Path]:
    """docs/*.md, and the README beside the docs folder (it shares some blocks)."""
    readme = directory.parent / "README.md"
    return sorted(directory.glob("*.md")) + ([readme] if readme.is_file() else [])


def drift(directory: Path = DOCS_DIR) -> list[str]:
    """Return the docs whose generated blocks are stale, and blocks no doc contains."""
    stale, seen = [], set()
    for path in _documents(directory):
        text = path.read_text(encoding="utf-8")
        seen |= {m["name"] for m in _BLOCK.finditer(text)}
        if render(text) != text:
            stale.append(path.name)
    stale += [f"(block {name} is in no doc)" for name in BLOCKS if name not in seen]
    return stale


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with --check, compare) the generated blocks of docs/*.md."""
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on drift")
    parser.add_argument("--dir", type=Path, default=DOCS_DIR, help="the docs folder")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift(args.dir)
        for name in stale:
            print(f"{args.dir / name}: out of date; run `{REGENERATE}`")
        return 1 if stale else 0
    for path in _documents(args.dir):
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
