"""schemas/ matches the models, and the example configs validate against the schema."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from devmgr._schema import REGENERATE, config_schema, drift, generate

ROOT = Path(__file__).resolve().parent.parent
# The checkout's schemas/, also when the tests run against an installed (non-editable)
# package, whose own folder has none.
SCHEMA_DIR = ROOT / "schemas"
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.toml"))


def test_schemas_match_the_models() -> None:
    stale = drift(SCHEMA_DIR)
    assert not stale, f"schemas/ is out of date ({', '.join(stale)}): run `{REGENERATE}`"
    assert "config.schema.json" in generate()


def test_drift_is_detected(tmp_path: Path) -> None:
    for name, text in generate().items():
        (tmp_path / name).write_text(text)
    assert drift(tmp_path) == []
    (tmp_path / "config.schema.json").write_text("{}\n")
    (tmp_path / "old.schema.json").write_text("{}\n")
    assert drift(tmp_path) == ["config.schema.json", "old.schema.json"]


# A small JSON Schema checker: just the keywords pydantic emits for these models.
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def schema_errors(
    value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$"
) -> list[str]:
    """Return where `value` breaks `schema` (a subset of JSON Schema 2020-12)."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return schema_errors(value, root["$defs"][name], root, at)
    if "anyOf" in schema:
        branches = [schema_errors(value, s, root, at) for s in schema["anyOf"]]
        return [] if any(not b for b in branches) else [f"{at}: matches no anyOf branch"]
    errors: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(value, bool)
        )
        if not ok:
            return [f"{at}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: {value!r} not in enum")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{at}: expected {schema['const']!r}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{at}: below minimum")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        errors.append(f"{at}: not above exclusiveMinimum")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{at}: missing {key}" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in props:
                errors += schema_errors(item, props[key], root, f"{at}.{key}")
                continue
            extra = schema.get("additionalProperties", True)
            if extra is False:
                errors.append(f"{at}: unknown key {key}")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, root, f"{at}.{key}")
            names = schema.get("propertyNames")
            if names is not None:
                errors += schema_errors(key, names, root, f"{at}.{key}(name)")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], root, f"{at}[{i}]")
    return errors


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_matches_schema(path: Path) -> None:
    schema = json.loads((SCHEMA_DIR / "config.schema.json").read_text())
    data = tomllib.loads(path.read_text())
    assert schema_errors(data, schema, schema) == []


def test_schema_refuses_what_the_loader_refuses() -> None:
    schema = config_schema()
    bad = {
        "manger": {},
        "devices": {
            "a": {
                "in": {"type": "ROUTER", "bnd": []},
                "out": {"bind": [], "options": {"sndhwmm": 1}},
                "restart": {"window": 0},
            }
        },
    }
    assert schema_errors(bad, schema, schema) == [
        "$: unknown key manger",
        "$.devices.a.in: unknown key bnd",
        "$.devices.a.out: missing type",
        "$.devices.a.out.options.sndhwmm(name): 'sndhwmm' not in enum",
        "$.devices.a.restart.window: not above exclusiveMinimum",
    ]
