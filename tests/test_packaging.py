"""The project's set-up files agree with each other."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements):
    return {re.split(r"[<>=!~ \[]", r.strip(), maxsplit=1)[0].lower() for r in requirements}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        expected |= set(extra)
    lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_entries = [
        line.split("#")[0].strip()[2:].strip()
        for line in lines
        if line.strip().startswith("- ") and line.startswith("      ")
    ]
    listed = {entry for entry in pip_entries if entry and entry != "-e ."}
    assert {_normalise(e) for e in listed} == {_normalise(e) for e in expected}


def _normalise(requirement: str) -> str:
    return requirement.replace(" ", "").lower()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert [
        line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))
    ] == ["make test"]
