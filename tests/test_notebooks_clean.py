"""Committed notebooks follow the house template and carry no outputs."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_the_numbered_notebooks_exist():
    names = [path.stem[:2] for path in NOTEBOOKS]
    assert names == sorted(set(names)), "notebook numbers must be unique"
    assert {"00", "01", "02", "03", "04", "05", "06"} <= set(names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_clean_and_follows_the_template(path):
    notebook = json.loads(path.read_text())
    cells = notebook["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert all(not cell.get("outputs") for cell in code), "clear outputs before committing"
    assert all(cell.get("execution_count") is None for cell in code)
    first = "".join(cells[0]["source"])
    assert first.startswith("# "), "the first cell is the H1 title"
    assert "colab.research.google.com" in "".join("".join(c["source"]) for c in cells[:2])
    parameters = [cell for cell in code if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(parameters) == 1 and "quick_mode()" in "".join(parameters[0]["source"])
    text = "".join("".join(cell["source"]) for cell in cells)
    assert "## Overview" in text and "## Setup" in text and "## Summary" in text
    assert "import tlkit" in text
