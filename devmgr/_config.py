"""Config files: find, read and validate them into `ManagerConfig`, reporting every problem.

Every public function here raises `ConfigError` (never pydantic's ValidationError) with one
`Problem(where, message)` per mistake, `where` being a dotted place such as
`devices.orders.in.type`, so the CLI (`devmgr validate`, `devmgr start`) and the control
socket (`add`, `reload`) report bad input the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from devmgr._errors import ConfigError, Problem
from devmgr._files import FileRefused, read_regular_file
from devmgr._spec import (
    DeviceSpec,
    Loc,
    ManagerConfig,
    ManagerSettings,
    SocketSpec,
    config_conflicts,
    did_you_mean,
    format_loc,
    render_issue,
    safe_text,
)

CONFIG_ENV = "DEVMGR_CONFIG"
LOCAL_CONFIG = "devmgr.toml"
_TOP_KEYS = ("manager", "devices")

# What pydantic's type errors expected, in the words of a config file.
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "path_type": "a path (a string)",
    "none_required": "nothing",
}
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


# --------------------------------------------------------------------------- errors


#: Problems one ConfigError lists; the rest are counted in a last line.
MAX_PROBLEMS = 50


def _invalid(problems: Iterable[Problem]) -> ConfigError:
    """Build the ConfigError, in text UTF-8 can carry (JSON may hold lone surrogates)."""
    found = list(problems)
    listed = [Problem(safe_text(p.where), safe_text(p.message)) for p in found[:MAX_PROBLEMS]]
    if len(found) > MAX_PROBLEMS:
        listed.append(Problem("", f"and {len(found) - MAX_PROBLEMS} more problems"))
    return ConfigError(listed)


def _describe(value: object) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = {dict: "table", list: "list", str: "string", bool: "boolean", int: "integer"}.get(
        type(value), type(value).__name__
    )
    return f"{text} ({kind})"


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated and Optional from a field annotation."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _model_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """Return the model class found at `loc` below `root`, if any."""
    current: Any = root
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
            if field is None:
                return None
            current = _unwrap(field.annotation)
        elif typing.get_origin(current) is dict:
            current = _unwrap(typing.get_args(current)[1])
        elif typing.get_origin(current) in (tuple, list):
            current = _unwrap(typing.get_args(current)[0])
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def problems_from(error: ValidationError, root: type[BaseModel], prefix: Loc = ()) -> list[Problem]:
    """Turn a pydantic ValidationError on `root` into Problems placed below `prefix`."""
    problems: list[Problem] = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        where = format_loc((*prefix, *loc))
        kind = item["type"]
        if len(problems) >= MAX_PROBLEMS:  # only counted by _invalid: skip the wording
            problems.append(Problem(where, item["msg"]))
            continue
        ctx = item.get("ctx") or {}
        if kind == "devmgr" and "issues" in ctx:
            for issue in ctx["issues"]:
                full, message = render_issue(issue, (*prefix, *loc))
                problems.append(Problem(format_loc(full), message))
        elif kind == "devmgr":
            problems.append(Problem(where, item["msg"]))
        elif kind == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            keys = _keys_of(parent) if parent is not None else []
            key = str(loc[-1])
            hint = did_you_mean(key, keys) if keys else ""
            known = f"; expected {', '.join(keys)}" if keys else ""
            problems.append(Problem(where, f"unknown key {key!r}{hint}{known}"))
        elif kind == "missing":
            parent = _model_at(root, loc[:-1])
            field = parent.model_fields.get(str(loc[-1])) if parent is not None else None
            if field is None and parent is not None:
                field = next((f for f in parent.model_fields.values() if f.alias == loc[-1]), None)
            hint = f": {field.description}" if field is not None and field.description else ""
            problems.append(Problem(where, f"required{hint}"))
        elif kind in _EXPECTED:
            problems.append(
                Problem(where, f"expected {_EXPECTED[kind]}, got {_describe(item['input'])}")
            )
        elif kind == "literal_error":
            problems.append(Problem(where, f"expected {ctx.get('expected', item['msg'])}"))
        else:
            problems.append(Problem(where, item["msg"]))
    return problems


# --------------------------------------------------------------------------- parsing


def _context(base_dir: Path | None) -> dict[str, Any]:
    return {"base_dir": base_dir}


def _device(
    data: object, key: str | None, base_dir: Path | None
) -> tuple[DeviceSpec | None, list[Problem]]:
    """Validate one device table; return the spec or the problems."""
    if key is None and isinstance(data, Mapping) and isinstance(data.get("name"), str):
        key = data["name"]
    prefix: Loc = ("devices", key) if key is not None else ()
    if not isinstance(data, Mapping):
        return None, [Problem(format_loc(prefix), f"expected a table, got {_describe(data)}")]
    crowded = _crowded_tables(data, prefix)
    if crowded:  # not validated key by key: each unknown key costs a did-you-mean
        return None, crowded
    problems: list[Problem] = []
    table = dict(data)
    if key is not None:
        if "name" in table and table["name"] != key:
            problems.append(
                Problem(
                    format_loc((*prefix, "name")),
                    f"{table['name']!r} differs from the device's name {key!r}",
                )
            )
        table["name"] = key
    try:
        spec = DeviceSpec.model_validate(table, context=_context(base_dir))
    except ValidationError as exc:
        return None, problems + problems_from(exc, DeviceSpec, prefix)
    return (None if problems else spec), problems


#: Keys a device table, or one of its sub-tables, may hold before it is refused whole.
_MAX_TABLE_KEYS = 64


def _crowded_tables(data: Mapping[Any, Any], prefix: Loc) -> list[Problem]:
    """Report a device table, or a sub-table of it, with far more keys than it has."""
    tables: list[tuple[Loc, Mapping[Any, Any], type[BaseModel]]] = [(prefix, data, DeviceSpec)]
    tables.extend(
        ((*prefix, key), data[key], model)
        for key, model in (("in", SocketSpec), ("out", SocketSpec), ("mon", SocketSpec))
        if isinstance(data.get(key), Mapping)
    )
    return [
        Problem(
            format_loc(where),
            f"{len(table)} keys; this table has only {', '.join(_keys_of(model))}",
        )
        for where, table, model in tables
        if len(table) > _MAX_TABLE_KEYS
    ]


def _check_files(settings: ManagerSettings) -> list[Problem]:
    """Check the files the manager will read (CURVE keys) exist and make sense."""
    if settings.curve is None:
        return []
    problems: list[Problem] = []
    secret, authorized = settings.curve.secret_key, settings.curve.authorized_keys
    try:
        if not secret.is_file():
            problems.append(
                Problem(
                    "manager.curve.secret_key",
                    f"{secret} does not exist (create it with zmq.auth.create_certificates "
                    "or `devmgr keygen`)",
                )
            )
        else:
            from devmgr._certs import read_certificate

            try:
                read_certificate(secret, secret=True)
            except ConfigError as exc:
                problems.append(Problem("manager.curve.secret_key", str(exc)))
        if not authorized.is_dir():
            problems.append(
                Problem(
                    "manager.curve.authorized_keys",
                    f"{authorized} is not a folder: it must hold the public certificates "
                    "(*.key) of the clients allowed to connect",
                )
            )
    except (OSError, ValueError) as exc:  # unreadable folders, NUL bytes in paths
        problems.append(Problem("manager.curve", f"cannot check the key files: {exc}"))
    return problems


def parse_config(data: object, *, path: Path | None = None) -> ManagerConfig:
    """Validate an already-parsed config (the TOML document as a dict).

    Relative paths (CURVE files, ipc:// paths) resolve against `path`'s folder.

    Raises:
        ConfigError: with every problem found.
    """
    if not isinstance(data, Mapping):
        raise _invalid([Problem("", f"a config is a table, got {_describe(data)}")])
    base_dir = path.parent if path is not None else None
    problems: list[Problem] = [
        Problem(
            str(key),
            f"unknown key {key!r}{did_you_mean(str(key), _TOP_KEYS)}; a config holds a "
            "[manager] table and [devices.NAME] tables",
        )
        for key in data
        if key not in _TOP_KEYS
    ]
    manager: ManagerSettings | None = None
    try:
        manager = ManagerSettings.model_validate(
            data.get("manager", {}), context=_context(base_dir)
        )
    except ValidationError as exc:
        problems.extend(problems_from(exc, ManagerSettings, ("manager",)))
    if manager is not None:
        problems.extend(_check_files(manager))
    devices, device_problems = _devices(data.get("devices", {}), base_dir)
    problems.extend(device_problems)
    problems.extend(
        Problem(format_loc(loc), message)
        for loc, message in map(render_issue, config_conflicts(manager, devices))
    )
    if problems or manager is None:
        raise _invalid(problems)
    try:
        return ManagerConfig(manager=manager, devices=devices, path=path)
    except ValidationError as exc:  # pragma: no cover - the checks above cover these rules
        raise _invalid(problems_from(exc, ManagerConfig)) from None


def _devices(raw: object, base_dir: Path | None) -> tuple[dict[str, DeviceSpec], list[Problem]]:
    if not isinstance(raw, Mapping):
        return {}, [Problem("devices", f"expected [devices.NAME] tables, got {_describe(raw)}")]
    devices: dict[str, DeviceSpec] = {}
    problems: list[Problem] = []
    for key, table in raw.items():
        spec, found = _device(table, str(key), base_dir)
        problems.extend(found)
        if spec is not None:
            devices[str(key)] = spec
    return devices, problems


def parse_device(
    data: object, *, name: str | None = None, base_dir: Path | None = None
) -> DeviceSpec:
    """Validate one device table (as JSON from the control `add` command, with `name`).

    Raises:
        ConfigError: with every problem, placed as `devices.NAME.in.type` etc.
    """
    spec, problems = _device(data, name, base_dir)
    if spec is None:
        raise _invalid(problems or [Problem("", "not a valid device")])
    return spec


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = read_regular_file(path).decode("utf-8")
    except FileNotFoundError:
        raise _invalid([Problem("", f"{path}: no such file")]) from None
    except UnicodeDecodeError as exc:
        raise _invalid([Problem("", f"{path}: not UTF-8 text ({exc.reason})")]) from None
    except FileRefused as exc:
        raise _invalid([Problem("", f"{path}: {exc}")]) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _invalid([Problem("", f"{path}: cannot read: {reason}")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_POSITION.search(message)
        if match:
            reason = message[: match.start()]
            place = f"line {match[1]}, column {match[2]}"
        else:
            reason = message.replace(" (at end of document)", "")
            place = f"line {text.count(chr(10)) + 1} (end of file)"
        raise _invalid([Problem("", f"{path}: {place}: invalid TOML: {reason}")]) from None


def load_config(path: str | os.PathLike[str]) -> ManagerConfig:
    """Read and validate a TOML config file.

    Raises:
        ConfigError: the file is missing, not TOML (with line and column), or invalid
            (every problem).
    """
    file = Path(path).absolute()
    return parse_config(_read_toml(file), path=file)


def parse_devices_file(path: str | os.PathLike[str]) -> list[DeviceSpec]:
    """Read a TOML file of [devices.NAME] tables (for `devmgr add FILE`).

    Raises:
        ConfigError: with every problem.
    """
    file = Path(path).absolute()
    data = _read_toml(file)
    problems = [
        Problem(str(key), "a devices file holds only [devices.NAME] tables")
        for key in data
        if key != "devices"
    ]
    devices, found = _devices(data.get("devices", {}), file.parent)
    problems.extend(found)
    problems.extend(
        Problem(format_loc(loc), message)
        for loc, message in map(render_issue, config_conflicts(None, devices))
    )
    if not problems and not devices:
        problems.append(Problem("devices", "no [devices.NAME] table in the file"))
    if problems:
        raise _invalid(problems)
    return list(devices.values())


def default_config() -> ManagerConfig:
    """Return the embedded default config (one monitored queue named `default`)."""
    text = resources.files("devmgr").joinpath("default.toml").read_text(encoding="utf-8")
    return parse_config(tomllib.loads(text), path=None)


def find_config(explicit: str | None) -> Path | None:
    """Return the config file to use: `explicit`, $DEVMGR_CONFIG, ./devmgr.toml, or None."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    local = Path(LOCAL_CONFIG)
    return local if local.is_file() else None


def resolve_config(explicit: str | None) -> ManagerConfig:
    """Load the config found as `find_config` says, else the embedded default."""
    path = find_config(explicit)
    return default_config() if path is None else load_config(path)


def validate_main(args: argparse.Namespace) -> int:
    """Run `devmgr validate [-c FILE]`: print `ok: N devices in FILE` (0) or every problem (2)."""
    try:
        config = resolve_config(getattr(args, "config", None))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 2
    for place, message in config.manager.warnings():
        print(f"warning: {place}: {message}", file=sys.stderr)
    count = len(config.devices)
    where = (
        str(config.path)
        if config.path is not None
        else "the embedded default config (no -c FILE, $DEVMGR_CONFIG or ./devmgr.toml)"
    )
    print(f"ok: {count} device{'' if count == 1 else 's'} in {where}")
    return 0
