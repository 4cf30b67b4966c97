"""The README and the docs/ pages as a reader uses them: every `python` command shown names a
module or script that exists and only flags its `--help` lists, every `make` target exists,
every Python example compiles, and every link between the pages resolves, anchors included.
Cheap on purpose: `--help` and file checks, never a server."""

from __future__ import annotations

import ast
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SHELL_OPERATORS = {"&", "&&", "|", "||", ";", "&)", ")"}


def fenced(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def shell_commands(page: Path) -> list[str]:
    """The logical lines of the page's bash blocks, and its inline code that starts a
    command: `python ...` or `make ...`."""
    commands = []
    for block in fenced(page, "bash"):
        commands += block.replace("\\\n", " ").splitlines()
    prose = FENCE.sub("", page.read_text())
    commands += [span.replace("\n", " ") for span in INLINE.findall(prose.replace("\n", " "))
                 if span.startswith(("python ", "make "))]
    return commands


def python_invocations(command: str) -> list[tuple[str, list[str]]]:
    """`python -m MOD --a x --b` -> [("-m MOD", ["--a", "--b"])]; a script: ("path", flags).
    Make's ARGS="..." count as flags of `python -m server`."""
    if "python" not in command and not command.lstrip().startswith("make "):
        return []
    tokens = shlex.split(command, comments=True)
    found = []
    for index, token in enumerate(tokens):
        if token.startswith("ARGS="):
            found.append(("-m server", flags_of(shlex.split(token.removeprefix("ARGS=")))))
        if token != "python" or index + 1 >= len(tokens):
            continue
        if tokens[index + 1] == "-m":
            found.append((f"-m {tokens[index + 2]}", flags_of(tokens[index + 3:])))
        elif tokens[index + 1].endswith(".py"):
            found.append((tokens[index + 1], flags_of(tokens[index + 2:])))
    return found


def flags_of(tokens: list[str]) -> list[str]:
    flags = []
    for token in tokens:
        if token in SHELL_OPERATORS or token.endswith(("&", ")")):
            break
        if token.startswith("--"):
            flags.append(token.split("=")[0])
    return flags


@functools.cache
def help_text(target: str) -> str:
    """What `python TARGET --help` prints (TARGET: `-m module` or a script path)."""
    done = subprocess.run([sys.executable, *target.split(), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"python {target} --help failed:\n{done.stderr[-2000:]}"
    return done.stdout


def make_targets() -> set[str]:
    rules = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
    return set(rules)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def invocations(page: Path) -> list[tuple[str, list[str]]]:
    return [found for command in shell_commands(page) for found in python_invocations(command)]


def test_the_commands_are_found_in_blocks_inline_and_in_make_args():
    bench = invocations(REPO / "docs" / "bench.md")
    shared = ["--url", "--contexts", "--group-sizes", "--share-cache"]
    assert ("bench/run_squad.py", shared) in bench
    assert ("-m server", ["--port", "--threads"]) in bench  # inline, in the prose
    readme = invocations(REPO / "README.md")
    assert ("-m server", ["--model"]) in readme  # make serve ARGS="..."
    compare = shell_commands(REPO / "docs" / "load-bench.md")
    assert ("-m server", ["--port"]) in python_invocations(
        next(c for c in compare if c.startswith("(cd ../before")))


@pytest.mark.slow  # each command's --help imports torch
@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_python_command_names_what_exists_with_flags_it_takes(page):
    for target, flags in invocations(page):
        if not target.startswith("-m "):
            assert (REPO / target).is_file(), f"{page.name}: no script {target}"
        usage = help_text(target)
        for flag in flags:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage), (
                f"{page.name}: python {target} has no {flag}")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_make_target_and_shell_script_exists(page):
    targets = make_targets()
    for command in shell_commands(page):
        if command.startswith("make "):
            named = [t for t in shlex.split(command, comments=True)[1:] if "=" not in t]
            assert set(named) <= targets, f"{page.name}: no make target in {command}"
        for script in re.findall(r"\bbash (\S+)", command):
            assert (REPO / script).is_file(), f"{page.name}: no script {script}: {command}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_python_examples_compile(page):
    for block in fenced(page, "python"):
        ast.parse(block)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_between_pages_resolve(page):
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: broken link {target}"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {path}"


def test_every_docs_page_has_a_title_and_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        assert page.read_text().startswith("# "), f"{page.name} has no title"
        assert f"(docs/{page.name})" in readme, f"the README does not link {page.name}"


def markdown_table(lines: list[str]) -> list[list[str]]:
    """The rows of the first table in `lines` (header and rule left out), cells stripped."""
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.lstrip().startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_readme_quotes_the_latest_run_of_the_load_bench():
    """Its llama.cpp figures are those of the load bench page's latest run, as that page gives
    them (ours / before / llama.cpp, each run's cells joined by "; "), and each ratio is
    theirs."""
    readme = (REPO / "README.md").read_text().splitlines()
    quoted = markdown_table(readme[next(i for i, line in enumerate(readme)
                                        if "Against llama.cpp's server" in line):])
    page = (REPO / "docs" / "load-bench.md").read_text().splitlines()
    latest = {row[0]: row for row in markdown_table(
        page[page.index("### The latest run"):])}
    names = {"burst": "burst", "trickle": "trickle", "mixed": "mixed (questions)"}
    assert [row[0].split()[0] for row in quoted] == list(names)
    for scenario, req_s, ttft, share in quoted:
        measured = latest[names[scenario.split()[0]]]
        runs = [run.split(" / ") for run in measured[1].split("; ")]
        assert req_s == "; ".join(f"{ours} / {theirs} ({float(ours) / float(theirs):.1f}x)"
                                  for ours, _, theirs in runs)
        for cell, column in ((ttft, 2), (share, 4)):
            runs = [run.split(" / ") for run in measured[column].split("; ")]
            assert cell == "; ".join(f"{ours} / {theirs}" for ours, _, theirs in runs)


def test_the_module_map_names_every_file_and_only_files_that_exist():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Module map"):].split("\n## ")[0].splitlines()
    named: set[str] = set()
    for row in markdown_table(section):
        previous = ""
        for path in re.findall(r"`([^`]+)`", row[0]):
            path = previous.rsplit(".", 1)[0] + path if path.startswith(".") else path
            named.add(path.rstrip("/"))
            previous = path
    assert all((REPO / path).exists() for path in named), sorted(
        path for path in named if not (REPO / path).exists())
    sources = {str(path.relative_to(REPO)) for package in ("model", "server", "bench", "train")
               for path in (REPO / package).rglob("*.py") if path.name != "__init__.py"}
    assert sources - named == set()
