"""Every code block of the README runs as written (or says, in the README, why not here).

Blocks are found by their fences. A block preceded by the comment
`<!-- not run by tests/test_readme.py: WHY -->` is left out, with its reason in the
README for a reader to see; every other block is run by its language:

- `sh`: command by command by tests/readme_driver.py, from a folder holding a copy of
  `deploy/`, in network and mount namespaces of its own (`unshare`), so the examples'
  fixed ports and /tmp paths cannot meet another run's; the block that installs devmgr
  into a fresh venv is a slow test; the test command is the one `.ci/run` runs;
- `python`: run as a script, as a user would paste it;
- `toml`: a config, checked by devmgr's own validation (`parse_config`);
- `json`: each line parses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devmgr._config import parse_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DRIVER = Path(__file__).with_name("readme_driver.py")
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_NOT_RUN = re.compile(r"<!-- not run by tests/test_readme\.py: (.+?) -->")
TEST_COMMAND = "python3 -m pip install '.[test]' && pytest"
INSTALL = "python3 -m venv .venv && . .venv/bin/activate\npython3 -m pip install ."


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the README's reason, when the block is left out

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'no language'})"


def blocks(text: str) -> list[Block]:
    found, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        indent, lang, start = fence.group(1), fence.group(2), index
        index += 1
        body = []
        while not lines[index].strip().startswith("```"):
            body.append(lines[index].removeprefix(indent))
            index += 1
        before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        reason = _NOT_RUN.search(before)
        found.append(Block(start + 1, lang, "\n".join(body) + "\n", reason and reason.group(1)))
        index += 1
    return found


ALL = blocks(README.read_text(encoding="utf-8"))


def _of(lang: str) -> list[Block]:
    return [b for b in ALL if b.lang == lang and b.not_run is None]


def test_every_block_is_run_or_says_why_not() -> None:
    runnable = {"sh", "python", "toml", "json"}
    unexplained = [str(b) for b in ALL if b.not_run is None and b.lang not in runnable]
    assert not unexplained, f"give these a language that is run, or a reason: {unexplained}"
    assert len(_of("sh")) >= 3 and len(_of("python")) >= 1


def test_the_test_command_is_what_ci_runs() -> None:
    assert any(b.text.strip() == TEST_COMMAND for b in _of("sh"))
    assert f'readme_test_command="{TEST_COMMAND}"' in (ROOT / ".ci" / "run").read_text()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not under /tmp: the driver mounts a private /tmp over it.
    folder = Path(tempfile.mkdtemp(prefix="devmgr-readme-", dir="/var/tmp"))
    shutil.copytree(ROOT / "deploy", folder / "deploy")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _kept_in_tmp() -> list[str]:
    """The folders in /tmp this run itself lives in (a CI venv, a clone, coverage data)."""
    places = [sys.prefix, sys.base_prefix, sys.executable, str(DRIVER), str(ROOT), *sys.path]
    places.append(os.environ.get("COVERAGE_FILE", ""))
    tops = set()
    for place in places:
        parts = Path(place).absolute().parts
        if len(parts) > 2 and parts[:2] == ("/", "tmp"):
            tops.add(f"/tmp/{parts[2]}")
    return sorted(tops)


def _run_sh(block: Block, workdir: Path) -> list[dict[str, object]]:
    script = workdir / "block.sh"
    script.write_text(block.text)
    # A private /tmp for the README's fixed paths, with this run's own folders bound back.
    saved = workdir / "host-tmp"
    saved.mkdir()
    steps = [f"mount --bind /tmp {saved}", "mount -t tmpfs tmpfs /tmp"]
    for top in _kept_in_tmp():
        steps.append(f"mkdir -p {top} && mount --bind {saved}{top[len('/tmp') :]} {top}")
    steps.append(f"exec {sys.executable} {DRIVER} {script} {workdir}")
    inner = " && ".join(steps)
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "--mount", "--fork", "sh", "-c", inner],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


SESSIONS = [b for b in _of("sh") if b.text.strip() not in (TEST_COMMAND, INSTALL)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", SESSIONS, ids=str)
def test_shell_block_runs(block: Block, workdir: Path) -> None:
    results = _run_sh(block, workdir)
    assert results, "no command ran"
    failed = [r for r in results if r["status"] != r["expected"]]
    assert not failed, json.dumps(failed, indent=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_install_block_runs_in_a_fresh_checkout(workdir: Path) -> None:
    (block,) = [b for b in _of("sh") if b.text.strip() == INSTALL]
    shutil.rmtree(workdir / "deploy")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, workdir / name)
    done = subprocess.run(
        ["bash", "-ec", block.text + "devmgr validate\n"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok: 1 device" in done.stdout + done.stderr


@pytest.mark.parametrize("block", _of("python"), ids=str)
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.text)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # each print(...) line ends with a comment saying what it prints
    expected = re.findall(r"^\s*print\(.*#\s*(\S+)\s*$", block.text, re.M)
    assert expected and done.stdout.split() == expected


@pytest.mark.parametrize("block", _of("toml"), ids=str)
def test_toml_block_is_a_valid_config(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "devmgr.toml"
    path.write_text(block.text)
    parse_config(tomllib.loads(block.text), path=path)


@pytest.mark.parametrize("block", _of("json"), ids=str)
def test_json_block_parses(block: Block) -> None:
    for line in block.text.splitlines():
        json.loads(line)


def test_the_curve_example_makes_its_keys_as_its_comment_says(workdir: Path) -> None:
    """deploy/examples/curve-control.toml's key commands, run as written, then validate."""
    text = (workdir / "deploy" / "examples" / "curve-control.toml").read_text()
    lines = text.splitlines()
    first = lines.index("#") + 1  # the commands: the lines between the first two bare "#"
    steps = [line[1:].strip() for line in lines[first : lines.index("#", first)]]
    assert steps[0].startswith("devmgr keygen") and steps[-1].startswith("devmgr validate")
    home = workdir / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVMGR_")}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    for step in steps:
        done = subprocess.run(
            ["bash", "-c", step], cwd=workdir, env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"{step}: {done.stdout}{done.stderr}"
    assert "ok: 1 device" in done.stdout + done.stderr
    authorized = sorted(p.name for p in (workdir / "deploy/examples/keys/authorized").iterdir())
    assert authorized == ["operator.key"]  # no secret key among the authorized ones


def test_the_pythons_named_are_the_ones_claimed() -> None:
    """README's prerequisites, requires-python and the classifiers name the same minors."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    prefix = "Programming Language :: Python :: 3."
    classified = [c.removeprefix(prefix) for c in project["classifiers"] if c.startswith(prefix)]
    minors = [f"3.{m}" for m in classified if m.isdigit()]
    assert project["requires-python"] == f">={minors[0]},<3.{int(classified[-1]) + 1}"
    named = ", ".join(minors[:-1]) + f" or {minors[-1]}"
    assert f"CPython {named}" in README.read_text()
