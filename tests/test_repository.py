"""The repository keeps its promises: README commands are what CI runs, and the code is ruff clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]]


def test_readme_opens_with_two_commands_that_ci_runs_verbatim():
    commands = readme_commands()
    assert len(commands) == 2
    assert "sclatent fit-vae" in commands[0] and "pytest" in commands[1]
    assert all("-c constraints.txt" in c for c in commands), "installs must pin torch through constraints.txt"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci_lines, f"{command!r} is not run by .ci/run"
    readme = (ROOT / "README.md").read_text()
    assert readme.index(commands[0]) < 600, "the main-job command must open the README"


def test_constraints_pin_torch_to_the_local_cpu_wheel():
    pins = (ROOT / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in pins


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    result = subprocess.run(
        [ruff, "check", "sclatent", "tests", "benchmarks", "tutorials"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_command_takes_max_epochs():
    from sclatent.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert len(commands) >= 6
    for name, subparser in commands.items():
        options = {option for action in subparser._actions for option in action.option_strings}
        assert "--max-epochs" in options, f"sclatent {name} lacks --max-epochs"


def test_readme_links_every_tutorial():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "tutorials").glob("*.md")):
        assert f"tutorials/{page.name}" in readme, f"README does not link {page.name}"
        assert page.with_suffix(".py").exists(), f"{page.name} has no script that regenerates it"
