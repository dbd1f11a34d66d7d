"""Generate the JSON Schemas in schemas/ from the pydantic models.

Run `python -m devmgr._schema` after changing a model; tests/test_schema.py fails while a
file in schemas/ differs from what this module generates. `--check` only compares.

Files: `config.schema.json` (the TOML config file, as a JSON document) and one
`<stem>.schema.json` per entry of `devmgr._protocol.SCHEMA_MODELS` (the control
protocol's requests, replies and events).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from devmgr._spec import ManagerConfig


def _default_dir() -> Path:
    """schemas/ of the checkout devmgr runs from, else ./schemas (an installed package)."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "schemas"
    return Path.cwd() / "schemas"


SCHEMA_DIR = _default_dir()
REGENERATE = "python -m devmgr._schema"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def config_schema() -> dict[str, Any]:
    """Return the schema of a config file (what `load_config` reads, TOML as JSON)."""
    schema = copy.deepcopy(ManagerConfig.model_json_schema(by_alias=True, mode="validation"))
    # `path` is where the file was read from, not a key of the file.
    schema["properties"].pop("path", None)
    # In a file the device name is its table key: `name` may be left out.
    device = schema["$defs"]["DeviceSpec"]
    device["required"] = [key for key in device["required"] if key != "name"]
    return {
        "$schema": _DIALECT,
        "title": "devmgr config file",
        "description": "The TOML config of devmgr (docs/config.md), as a JSON document. "
        "Generated from devmgr._spec by `" + REGENERATE + "`.",
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
    }


def _protocol_models() -> dict[str, type[BaseModel]]:
    try:
        protocol = importlib.import_module("devmgr._protocol")
    except ModuleNotFoundError:
        return {}
    models: dict[str, type[BaseModel]] = getattr(protocol, "SCHEMA_MODELS", {})
    from devmgr._commands import ARGS_SCHEMA_MODELS

    return {**models, **ARGS_SCHEMA_MODELS}


def model_schema(stem: str, model: type[BaseModel]) -> dict[str, Any]:
    """Return the schema of one protocol model, named after its file stem."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": _DIALECT, "$id": f"{stem}.schema.json", **schema}


def generate() -> dict[str, str]:
    """Return every schema file's name and text."""
    schemas = {"config": config_schema()}
    for stem, model in sorted(_protocol_models().items()):
        schemas[stem] = model_schema(stem, model)
    return {f"{stem}.schema.json": json.dumps(s, indent=2) + "\n" for stem, s in schemas.items()}


def drift(directory: Path = SCHEMA_DIR) -> list[str]:
    """Return the files in `directory` that are missing, stale or not generated."""
    wanted = generate()
    present = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
    problems = [
        name
        for name, text in wanted.items()
        if name not in present or (directory / name).read_text(encoding="utf-8") != text
    ]
    problems.extend(sorted(present - set(wanted)))
    return problems


def main(argv: list[str] | None = None) -> int:
    """Write (or with --check, compare) the schema files; return an exit status."""
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on drift")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="output folder")
    args = parser.parse_args(argv)
    if args.check:
        stale = drift(args.dir)
        for name in stale:
            print(f"{args.dir / name}: out of date; run `{REGENERATE}`")
        return 1 if stale else 0
    args.dir.mkdir(parents=True, exist_ok=True)
    wanted = generate()
    for stale in set(p.name for p in args.dir.glob("*.json")) - set(wanted):
        (args.dir / stale).unlink()
    for name, text in wanted.items():
        (args.dir / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(wanted)} schemas to {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
