"""docs/ describes the interface the code has: its generated blocks match the code."""

from __future__ import annotations

from pathlib import Path

from devmgr import _docs

ROOT = Path(__file__).resolve().parent.parent


def test_docs_match_the_code() -> None:
    stale = _docs.drift(ROOT / "docs")
    assert not stale, f"docs/ is out of date ({', '.join(stale)}): run `{_docs.REGENERATE}`"


def test_drift_is_seen(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    (tmp_path / "protocol.md").write_text(text.replace("`unknown_device`", "`no_device`", 1))
    assert "protocol.md" in _docs.drift(tmp_path)
    # and regenerating brings it back
    assert _docs.main(["--dir", str(tmp_path)]) == 0
    assert (tmp_path / "protocol.md").read_text(encoding="utf-8") == text


def test_every_cli_subcommand_and_command_is_documented() -> None:
    cli = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for name, _help, _parser in _docs._subcommands():
        assert f"### `devmgr {name}`" in cli
    protocol = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    from devmgr._commands import COMMANDS

    for command in COMMANDS:
        assert f"| `{command}` |" in protocol


def test_no_comment_cites_the_missing_contract() -> None:
    """Comments cite docs/ (which is in the repository), not an outside CONTRACT file."""
    cited = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("devmgr", "core", "tests")
        for path in sorted((ROOT / folder).rglob("*"))
        if path.suffix in {".py", ".pyx", ".pyi", ".pxi"}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "CONTRACT" in line and path.name != "test_docs.py"
    ]
    assert not cited, cited
