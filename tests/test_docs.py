"""The README is a front page and the guides live in docs/: its length, its links, the CLI
reference generated from ``--help``, the API page against ``ibnify.__all__`` and the test
commands CI runs."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import ibnify
from ibnify.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 180
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces → -."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of every heading outside fenced blocks."""
    found, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.add(slug(line))
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file, or ``#anchor`` in a Markdown file, is missing."""
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        missing = not file.exists()
        if not missing and anchor and file.suffix == ".md":
            missing = anchor not in anchors(file.read_text(encoding="utf-8"))
        if missing:
            broken.append(target)
    return broken


def test_the_helpers_read_headings_and_links() -> None:
    text = "# A b\n```\n# not a heading\n```\n## Where should IN go? `analyze` and `search`\n"
    assert anchors(text) == {"a-b", "where-should-in-go-analyze-and-search"}
    assert LINK.findall("[x](docs/a.md) and [y](../R.md#h) [z](https://e.org)") == [
        "docs/a.md",
        "../R.md#h",
        "https://e.org",
    ]


def test_the_readme_is_a_front_page_of_at_most_180_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, len(lines)
    headings = [line for line in lines if line.startswith("## ")]
    for heading in ("## Install", "## Quickstart", "## Guides", "## Tests"):
        assert heading in headings


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    linked = {target.partition("#")[0] for target in LINK.findall(readme)}
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert pages >= {f"docs/{n}.md" for n in ("convert", "finetune", "search", "adapt", "deploy")}
    assert pages - linked == set()


def test_no_relative_link_or_anchor_is_broken() -> None:
    """Content moved between pages keeps its links: every relative link of the README, the docs
    pages and CONTRIBUTING.md names a file that exists and, for a Markdown page, a heading in it."""
    pages = [README, ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]
    assert {page.name: broken_links(page) for page in pages if broken_links(page)} == {}


def _generator():
    """docs/make_cli_reference.py, imported from its path (docs/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        "make_cli_reference", DOCS / "make_cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_what_the_generator_writes_now() -> None:
    """docs/cli.md is generated from every command's ``--help``; after a change to any option
    run ``python docs/make_cli_reference.py`` (this test fails until then)."""
    generator = _generator()
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert page == generator.reference(), "docs/cli.md is stale: python docs/make_cli_reference.py"
    sections = re.findall(r"^## ibnify (\w+)$", page, flags=re.M)
    assert sections == sorted(cli.commands) and len(sections) >= 11
    for name in sections:  # each section holds that command's own usage line and options
        assert f"Usage: ibnify {name} [OPTIONS]" in generator.command_help(name)
        assert "--help" in generator.command_help(name)


def _api_names() -> list[str]:
    """The names in the first column of every table on docs/api.md."""
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    return re.findall(r"^\| `([\w.]+)` \|", text, flags=re.M)


def test_the_api_page_lists_exactly_the_public_root_names() -> None:
    names = _api_names()
    assert len(names) == len(set(names)), "a name listed twice"
    assert set(names) == set(ibnify.__all__)
    for name in names:
        assert getattr(ibnify, name) is not None, name
    assert {"convert", "FinetuneConfig", "ImageData", "IbnifyError"} <= set(names)


def test_the_readme_gives_the_test_commands_ci_runs_verbatim() -> None:
    """.ci/run runs the README's test commands; each one is a line of a README bash block."""
    ci = (ROOT / ".ci" / "run").read_text()
    runs = [shlex.split(line)[1:] for line in ci.splitlines() if line.startswith("run_tests ")]
    commands = [" ".join(argv[1:] if argv[0] == "env" else argv) for argv in runs]
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    lines = {line.strip() for block in blocks for line in block.splitlines()}
    assert len(commands) == 3
    assert [c for c in commands if c not in lines] == []
