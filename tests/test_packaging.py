"""The project's set-up files agree with each other."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

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
    assert "-c constraints.txt" in pip_entries, "environment.yml installs with the pins"
    listed = {
        entry for entry in pip_entries if entry and entry not in ("-e .", "-c constraints.txt")
    }
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


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"constraints.txt pins exactly: {line}"
            pins[requirement.name.lower()] = specifier.version
    return pins


def test_constraints_pin_every_dependency_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra]
    pins = _constraints()
    for requirement in requirements:
        name = requirement.name.lower()
        assert name in pins, f"constraints.txt has no pin for {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside pyproject's {requirement.specifier}"
        )


def test_install_paths_keep_an_existing_tensorflow():
    """pyproject has ranges (Colab keeps its TensorFlow); make installs the tested pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    exact = [r for r in project["dependencies"] if "==" in r]
    assert not [r for r in exact if Requirement(r).name in ("tensorflow", "keras")], exact
    assert _constraints()["tensorflow"] == "2.21.0"
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS := -c constraints.txt" in makefile
    assert makefile.count("$(CONSTRAINTS)") == 2


def test_licence_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
