"""Notebook code cells that repeat themselves or validate on the test split fail here.

Exercise solutions are checked here too: each is a "### Solution ..." markdown heading after the
notebook's "## Exercises" section, followed by a collapsed code cell (cell metadata
`"jupyter": {"source_hidden": true}`) that nbval runs in CI like any other cell (no skip tag) and
that asserts what it measured.

Two mistakes that once shipped: a code cell pasted twice (notebook 10's plot cell was a copy of
its run cell, so the experiment ran twice and no figure appeared), and the test split passed as
validation data (notebooks 08 and 10). Both checks parse the code cells with `ast`; the second
maps positional arguments to parameter names with the signatures of the tlkit functions that take
validation data, so `train_head(head, train, test_features)` is caught as well as
`fit(..., validation_data=test_images)`.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest

from tlkit import detect, fine_tuning, heads, semi

# Notebooks whose Exercises have at least one collapsed, executed solution (issue #12).
SOLVED = {"01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11", "13"}
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# tlkit functions that take validation data, by the name a notebook calls them with.
_TAKES_VALIDATION = {
    function.__name__: function
    for function in (
        heads.train_head,
        fine_tuning.fine_tune,
        fine_tuning.fine_tune_split,
        fine_tuning.fine_tune_cached,
        detect.train_detector,
        detect.fine_tune_detector,
        semi.pseudo_label,
        semi.fixmatch,
    )
}


def code_cells(notebook: dict) -> list[str]:
    """The source of every code cell, IPython magics and shell lines blanked for `ast`."""
    cells = []
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            cells.append(re.sub(r"(?m)^(\s*)[%!].*$", r"\1pass", source))
    return cells


def duplicated_code_cells(notebook: dict) -> list[int]:
    """Positions (among code cells) of cells whose code repeats an earlier cell's."""
    seen, repeated = set(), []
    for position, source in enumerate(code_cells(notebook)):
        key = source.strip()
        if key and key in seen:
            repeated.append(position)
        seen.add(key)
    return repeated


def _mentions_test(node: ast.AST) -> bool:
    """True if an expression names a test split: `test_split`, `flowers.test`, `splits["test"]`."""
    for child in ast.walk(node):
        words = []
        if isinstance(child, ast.Name):
            words = child.id.lower().split("_")
        elif isinstance(child, ast.Attribute):
            words = child.attr.lower().split("_")
        elif isinstance(child, ast.Constant) and isinstance(child.value, str):
            words = [child.value.lower()]
        if "test" in words:
            return True
    return False


def _callee_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _validation_arguments(call: ast.Call) -> list[ast.AST]:
    """The arguments of a call that are validation data, by keyword or by position."""
    found = [k.value for k in call.keywords if k.arg and "validation" in k.arg]
    function = _TAKES_VALIDATION.get(_callee_name(call))
    if function is not None:
        names = list(inspect.signature(function).parameters)
        for name, argument in zip(names, call.args, strict=False):
            if "validation" in name:
                found.append(argument)
    return found


def validation_on_test(notebook: dict) -> list[str]:
    """The source of each call that passes a test split as validation data."""
    offences = []
    for source in code_cells(notebook):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and any(map(_mentions_test, _validation_arguments(node))):
                offences.append(ast.get_source_segment(source, node) or ast.dump(node))
    return offences


SOLUTION_HEADING = re.compile(r"^#{2,4} Solution\b")
# nbval and nbconvert tags that would keep a cell from running (or from failing) in CI.
_SKIP_TAGS = {"nbval-skip", "skip-execution", "raises-exception", "nbval-ignore-output"}


def _is_hidden(cell: dict) -> bool:
    return bool(cell.get("metadata", {}).get("jupyter", {}).get("source_hidden", False))


def _is_solution_heading(cell: dict) -> bool:
    return cell["cell_type"] == "markdown" and bool(SOLUTION_HEADING.match("".join(cell["source"])))


def _asserts(source: str) -> bool:
    """True if the code has an `assert` statement or calls an `assert_*` function."""
    for node in ast.walk(ast.parse(re.sub(r"(?m)^(\s*)[%!].*$", r"\1pass", source))):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call) and _callee_name(node).startswith("assert_"):
            return True
    return False


def solution_problems(notebook: dict) -> tuple[list[str], int]:
    """What is wrong with a notebook's exercise solutions, and how many it has."""
    problems, solutions, exercises_seen = [], 0, False
    cells = notebook["cells"]
    for index, cell in enumerate(cells):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and "## Exercises" in source:
            exercises_seen = True
        if _is_solution_heading(cell):
            following = cells[index + 1] if index + 1 < len(cells) else None
            if not exercises_seen:
                problems.append(f"cell {index}: a solution before the '## Exercises' section")
            if following is None or following["cell_type"] != "code" or not _is_hidden(following):
                problems.append(
                    f"cell {index}: a solution heading must be followed by a collapsed code cell "
                    '(metadata "jupyter": {"source_hidden": true})'
                )
        if cell["cell_type"] == "code" and _is_hidden(cell):
            solutions += 1
            if index == 0 or not _is_solution_heading(cells[index - 1]):
                problems.append(
                    f"cell {index}: a collapsed code cell without a '### Solution' heading"
                )
            tags = set(cell.get("metadata", {}).get("tags", []))
            if tags & _SKIP_TAGS:
                problems.append(
                    f"cell {index}: a solution must run in CI; remove {sorted(tags & _SKIP_TAGS)}"
                )
            if not _asserts(source):
                problems.append(f"cell {index}: a solution must assert what it measured")
    return problems, solutions


def _notebook(*sources: str) -> dict:
    return {"cells": [{"cell_type": "code", "source": [s]} for s in sources]}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_no_notebook_repeats_a_code_cell(path):
    notebook = json.loads(path.read_text())
    assert duplicated_code_cells(notebook) == [], f"{path.name} repeats a code cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_no_notebook_validates_on_the_test_split(path):
    notebook = json.loads(path.read_text())
    assert validation_on_test(notebook) == [], path.name


def test_the_duplicate_check_catches_a_pasted_cell():
    run = "rows = []\nfor seed in SEEDS:\n    rows.append(run(seed))\n"
    assert duplicated_code_cells(_notebook("import tlkit", run, "print(rows)", run + "\n")) == [3]
    assert duplicated_code_cells(_notebook("import tlkit", run, "print(rows)")) == []


@pytest.mark.parametrize(
    "source",
    [
        "head.fit(x, validation_data=test_split.to_dataset(64))",
        "model.fit(x, validation_data=student_splits['test'].to_dataset(64))",
        "pseudo_label(head, labelled, unlabelled, validation=test_features)",
        "fine_tune_cached(base, head, train_split, validation_split=flowers.test)",
        "tlkit.train_head(head, train_features, test_features, epochs=3)",  # By position.
        "%pip install tlkit\nfit(x, validation_data=test_images)",
    ],
)
def test_the_validation_check_catches_a_test_split(source):
    assert len(validation_on_test(_notebook(source))) == 1


@pytest.mark.parametrize(
    "source",
    [
        "head.fit(x, validation_data=validation_split.to_dataset(64))",
        "tlkit.train_head(head, features['train'], features['validation'])",
        "fine_tune_cached(base, head, train_split, validation_split=validation_split)",
        "accuracy = evaluate_head(head, test_features)",  # Testing on test is the point.
        "detect.train_detector(detector, train_data, validation_data, epochs=3)",
    ],
)
def test_the_validation_check_passes_validation_data(source):
    assert validation_on_test(_notebook(source)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_solutions_are_collapsed_run_in_ci_and_assert(path):
    problems, _ = solution_problems(json.loads(path.read_text()))
    assert problems == [], f"{path.name}: {problems}"


@pytest.mark.parametrize(
    "path", [path for path in NOTEBOOKS if path.stem[:2] in SOLVED], ids=lambda path: path.stem
)
def test_notebooks_have_exercise_solutions(path):
    _, solutions = solution_problems(json.loads(path.read_text()))
    assert solutions >= 1, f"{path.name} has Exercises but no collapsed, executed solution"


def _cells(*cells: tuple[str, str, bool]) -> dict:
    return {
        "cells": [
            {
                "cell_type": kind,
                "source": [source],
                "metadata": {"jupyter": {"source_hidden": True}} if hidden else {},
            }
            for kind, source, hidden in cells
        ]
    }


def test_the_solution_check_accepts_a_collapsed_asserting_solution():
    notebook = _cells(
        ("markdown", "## Exercises\n1. Try it.", False),
        ("markdown", "### Solution to exercise 1", False),
        ("code", "gain = a - b\nassert gain > 0, gain", True),
        ("markdown", "### Solution to exercise 2", False),
        ("code", "np.testing.assert_allclose(a, b)", True),
    )
    assert solution_problems(notebook) == ([], 2)


@pytest.mark.parametrize(
    "cells",
    [
        # The solution's code is visible, not collapsed.
        [
            ("markdown", "## Exercises", False),
            ("markdown", "### Solution", False),
            ("code", "assert a > b", False),
        ],
        # A collapsed cell without a heading.
        [("markdown", "## Exercises", False), ("code", "assert a > b", True)],
        # A solution that asserts nothing.
        [
            ("markdown", "## Exercises", False),
            ("markdown", "### Solution", False),
            ("code", "print(a - b)", True),
        ],
        # A solution before the exercises.
        [
            ("markdown", "### Solution", False),
            ("code", "assert a > b", True),
            ("markdown", "## Exercises", False),
        ],
    ],
)
def test_the_solution_check_catches_a_bad_solution(cells):
    problems, _ = solution_problems(_cells(*cells))
    assert len(problems) == 1, problems


def test_the_solution_check_catches_a_skipped_solution():
    notebook = _cells(
        ("markdown", "## Exercises", False),
        ("markdown", "### Solution", False),
        ("code", "assert a > b", True),
    )
    notebook["cells"][2]["metadata"]["tags"] = ["nbval-skip"]
    problems, _ = solution_problems(notebook)
    assert len(problems) == 1 and "nbval-skip" in problems[0], problems
