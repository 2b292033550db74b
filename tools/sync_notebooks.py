"""Makes every notebook's Colab badge and `%pip install` line agree with pyproject.toml.

The repository's address has one source of truth: `Repository` in
`[project.urls]` of pyproject.toml. When the repository moves, change it there
and run

    python tools/sync_notebooks.py          # rewrites notebooks/*.ipynb
    python tools/sync_notebooks.py --check  # exit 1 if a notebook disagrees

Only the badge links and the `tlkit @ git+...` install lines are touched; the
notebooks keep nbformat's own JSON layout, so the diff is those lines alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BRANCH = "main"

_BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^)\s\"]+?/notebooks/[\w.-]+")
_INSTALL = re.compile(r"tlkit @ git\+[^\s\"\\]+")


def repository_url(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The `Repository` entry of `[project.urls]`, without a trailing slash or `.git`.

    Raises:
        ValueError: If it is missing or not a https://github.com/OWNER/NAME address
            (Colab opens notebooks from GitHub only).
    """
    urls = tomllib.loads(pyproject.read_text())["project"].get("urls", {})
    url = urls.get("Repository", "").rstrip("/").removesuffix(".git")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(
            "pyproject.toml needs [project.urls] Repository = 'https://github.com/OWNER/NAME' "
            f"(Colab badges open notebooks from GitHub). Received: Repository={url!r}"
        )
    return url


def expected_badge(url: str, notebook_name: str) -> str:
    """The Colab link of one notebook of the repository at `url`."""
    path = url.removeprefix("https://github.com/")
    return (
        f"https://colab.research.google.com/github/{path}/blob/{BRANCH}/notebooks/{notebook_name}"
    )


def expected_install(url: str) -> str:
    """The requirement the notebooks' Colab set-up cell installs."""
    return f"tlkit @ git+{url}"


def rewrite(notebook: dict, url: str, notebook_name: str) -> dict:
    """Returns `notebook` with every badge and install line pointing at `url`."""
    badge = expected_badge(url, notebook_name)
    install = expected_install(url)
    for cell in notebook["cells"]:
        cell["source"] = [_INSTALL.sub(install, _BADGE.sub(badge, line)) for line in cell["source"]]
    return notebook


def problems(path: Path, url: str) -> list[str]:
    """What in one notebook disagrees with `url` (empty when it agrees)."""
    notebook = json.loads(path.read_text())
    text = "".join("".join(cell["source"]) for cell in notebook["cells"])
    badges = _BADGE.findall(text)
    installs = _INSTALL.findall(text)
    found = []
    if not badges:
        found.append(f"{path.name}: no Colab badge")
    if not installs:
        found.append(f'{path.name}: no `%pip install "{expected_install(url)}"` line')
    found += [
        f"{path.name}: badge {badge} (expected {expected_badge(url, path.name)})"
        for badge in badges
        if badge != expected_badge(url, path.name)
    ]
    found += [
        f"{path.name}: install {install!r} (expected {expected_install(url)!r})"
        for install in installs
        if install != expected_install(url)
    ]
    return found


def _write(path: Path, notebook: dict) -> None:
    # nbformat's layout: indent 1, sorted keys, non-ASCII kept, final newline.
    text = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report disagreements")
    arguments = parser.parse_args(argv)
    url = repository_url()
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if arguments.check:
        found = [problem for path in paths for problem in problems(path, url)]
        print("\n".join(found) or f"all {len(paths)} notebooks point at {url}")
        return 1 if found else 0
    for path in paths:
        before = path.read_text()
        _write(path, rewrite(json.loads(before), url, path.name))
        if path.read_text() != before:
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
