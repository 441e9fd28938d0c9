"""The docs stay honest where that is cheap to check.

* Every repository path and every ``lazymig.`` dotted name in backticks in
  README.md and docs/*.md exists (a path on disk; a module, or an attribute
  reached from one).
* Every option of a ``lazymig`` command line in the docs, and every option named
  on its own, is in the ``--help`` of that command (or of ``lazymig``).
* The README's Python tour compiles, its imports resolve, and every call to
  something it imported binds to that object's current signature.
* benchmarks/report.py rewrites exactly its own section of docs/benchmarks.md,
  and every benchmark that publishes has a filled section there.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import code_blocks

from lazymig.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
PATH_ROOTS = ("lazymig/", "tests/", "benchmarks/", "scripts/", "docs/", ".ci/", "examples/")

FOREIGN_OPTIONS = {
    "--mount-proc",  # unshare(1), named in criu-interop.md
}
"""Options named on their own in the docs that belong to another program."""

SHELL_BLOCKS = ("sh", "bash", "console", "")


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def code_spans(text: str) -> list[str]:
    """Inline code of a Markdown page (fenced blocks left out)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def resolve(dotted: str) -> object:
    """The module or attribute a dotted name points to; raises if there is none."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_paths_and_names_in_the_docs_exist(page: Path) -> None:
    spans = code_spans(page.read_text())
    paths = {span.split()[0].rstrip(".,:;") for span in spans
             if span.startswith(PATH_ROOTS)}
    missing = [p for p in sorted(paths)
               if not (list(REPO.glob(p)) if "*" in p else (REPO / p).exists())]
    assert not missing, f"{page_id(page)} names paths that do not exist: {missing}"
    names = {m for span in spans for m in re.findall(r"\blazymig(?:\.\w+)+", span)}
    broken = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            broken.append(f"{name} ({exc})")
    assert not broken, f"{page_id(page)} names what does not exist: {broken}"


def test_the_name_check_catches_a_wrong_name() -> None:
    assert resolve("lazymig.uffd.daemon.LazyPagesDaemon.run") is not None
    with pytest.raises(AttributeError):
        resolve("lazymig.uffd.daemon.LazyPagesDaemon.no_such_method")
    with pytest.raises(ModuleNotFoundError):
        resolve("lazymig_no_such_package.x")


def test_architecture_names_every_module() -> None:
    """The layer tables of architecture.md place every module of the package: its
    path, or its directory, is in the first column of a table row."""
    text = (REPO / "docs" / "architecture.md").read_text()
    first_cells = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    named = {span.split()[0] for cell in first_cells for span in code_spans(cell)}
    modules = [p.relative_to(REPO) for p in sorted((REPO / "lazymig").rglob("*.py"))
               if "_pb2" not in p.name and p.name not in ("__init__.py", "__main__.py",
                                                          "_version.py")]
    unnamed = [str(m) for m in modules
               if str(m) not in named and not any(
                   str(m).startswith(n) for n in named if n.endswith("/"))]
    assert not unnamed, f"docs/architecture.md does not place: {unnamed}"


# -- CLI options ------------------------------------------------------------------------------


def help_options() -> dict[str | None, set[str]]:
    """Options in ``lazymig --help`` (key None) and in each ``lazymig CMD --help``."""
    parser = build_parser()
    options: dict[str | None, set[str]] = {None: _options_in(parser.format_help())}
    for action in parser._actions:  # the one public way to reach the subparsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                options[name] = _options_in(sub.format_help())
    return options


def _options_in(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))


def normalized(option: str) -> list[str]:
    """``--wire=v1`` -> ``--wire``; ``-W/--work-dir`` -> both; ``-vv`` -> ``-v``."""
    option = option.split("=", maxsplit=1)[0]
    if re.fullmatch(r"-(v)\1+", option):
        return ["-v"]
    return [part for part in option.split("/") if part.startswith("-")]


def lazymig_command_lines(text: str) -> Iterator[str]:
    """Command lines that may run lazymig: inline code and shell blocks (not the
    ``text`` blocks, which hold program output)."""
    yield from code_spans(text)
    for lang in SHELL_BLOCKS:
        for block in code_blocks(text, lang):
            yield from block.splitlines()


def commands(line: str) -> Iterator[tuple[str | None, list[str]]]:
    """(subcommand, its option tokens) for each ``lazymig`` invocation on a line."""
    line = re.sub(r"^\s*[\w.-]*[#$]\s+", "", line)  # a prompt: src#, $
    line = re.sub(r"(^|\s)#.*$", "", line)  # a comment
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    for i, word in enumerate(words):
        if word.rsplit("/", 1)[-1] != "lazymig":
            continue
        rest = words[i + 1:]
        for j, w in enumerate(rest):
            if w in ("&", "&&", "|", ";", "||"):
                rest = rest[:j]
                break
        subcommand = next((w for w in rest if not w.startswith("-")), None)
        yield subcommand, [w for w in rest if w.startswith("-") and len(w) > 1]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_cli_options_in_the_docs_exist(page: Path) -> None:
    known = help_options()
    everything = set().union(*known.values())
    text = page.read_text()
    wrong: list[str] = []
    for line in lazymig_command_lines(text):
        for subcommand, options in commands(line):
            if subcommand not in known:
                if subcommand is not None and re.fullmatch(r"[a-z-]+", subcommand):
                    wrong.append(f"lazymig {subcommand}: no such command")
                continue
            allowed = known[subcommand] | known[None]
            wrong += [f"lazymig {subcommand} {o}" for opt in options for o in normalized(opt)
                      if o not in allowed]
    for span in code_spans(text):
        first = span.split()[0]
        if first.startswith("-") and first not in FOREIGN_OPTIONS:
            wrong += [o for o in normalized(first) if o not in everything]
    assert not wrong, f"{page_id(page)} names options lazymig does not have: {wrong}"


def test_the_option_check_catches_a_wrong_option() -> None:
    """The check above can fail: a made-up option or command is reported."""
    known = help_options()
    ((sub, opts),) = list(commands("dst# lazymig restore --lazy-pages --made-up -D /tmp/1 &"))
    assert sub == "restore" and "--made-up" in opts and "--made-up" not in known["restore"]
    assert "--lazy-pages" in known["restore"] and "-D" in known["restore"]
    assert "--no-uvloop" in known[None]


# -- the README's Python tour -------------------------------------------------------------------


def python_tour() -> list[str]:
    return code_blocks((REPO / "README.md").read_text(), "python")


def test_readme_has_a_python_tour() -> None:
    assert python_tour(), "README.md has no ```python block"


@pytest.mark.parametrize("index", range(len(python_tour())))
def test_readme_python_tour_matches_the_api(index: int) -> None:
    source = python_tour()[index]
    tree = ast.parse(source, f"README.md python block {index}")
    compile(tree, "README.md", "exec")
    imported: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.asname or alias.name.split(".")[0]] = importlib.import_module(
                    alias.name if alias.asname else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            assert node.module is not None
            module = importlib.import_module(node.module)
            for alias in node.names:
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    mismatched = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(
                isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None for k in node.keywords):
            continue
        target = _callee(node.func, imported)
        if target is None or isinstance(target, ModuleType):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin without a signature
            continue
        try:
            signature.bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
        except TypeError as exc:
            mismatched.append(f"line {node.lineno}: {ast.unparse(node.func)}(...): {exc}")
    assert not mismatched, mismatched


def _callee(func: ast.expr, imported: dict[str, object]) -> Any:
    """The object a call's function expression names, when it starts from an import."""
    if isinstance(func, ast.Name):
        return imported.get(func.id)
    if isinstance(func, ast.Attribute):
        base = _callee(func.value, imported)
        return None if base is None else getattr(base, func.attr)
    return None


# -- benchmarks/report.py -----------------------------------------------------------------------


def load_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_rewrites_only_its_own_section(tmp_path: Path) -> None:
    report = load_report()
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nprose\n\n## a\n\n<!-- benchmark:a begin -->\nold a\n"
                   "<!-- benchmark:a end -->\n\n## b\n\n<!-- benchmark:b begin -->\nold b\n"
                   "<!-- benchmark:b end -->\n\nclosing prose\n")
    output = ["machine: 2 CPUs", "  limit  x  1.0 GB/s", "", "| a | b |", "| --- | --- |",
              "| 1 | 2 |", "legend line"]
    report.publish("a", output, "`benchmarks/a.py`, run today.", doc)
    text = doc.read_text()
    assert "old a" not in text and "old b" in text
    assert text.startswith("# Benchmarks\n\nprose\n") and text.endswith("closing prose\n")
    section = text[text.index("<!-- benchmark:a begin -->"):text.index("<!-- benchmark:a end")]
    assert "`benchmarks/a.py`, run today." in section
    assert "```text\nmachine: 2 CPUs\n  limit  x  1.0 GB/s\n```" in section
    assert "\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n```text\nlegend line\n```" in section
    report.publish("a", output, "`benchmarks/a.py`, run today.", doc)
    assert doc.read_text() == text  # idempotent

    report.publish("new", ["42"], "`benchmarks/new.py`", doc)
    text2 = doc.read_text()
    assert text2.startswith(text.rstrip())
    assert text2.endswith("## new\n\n<!-- benchmark:new begin -->\n`benchmarks/new.py`\n\n"
                          "```text\n42\n```\n<!-- benchmark:new end -->\n")


def test_every_publishing_benchmark_has_a_filled_section() -> None:
    text = (REPO / "docs" / "benchmarks.md").read_text()
    names = {name: script.name for script in (REPO / "benchmarks").glob("*.py")
             for name in re.findall(r"report\.recorded\(\"(\w+)\"", script.read_text())}
    assert {"daemon", "page_server", "dump_cost", "criu_side_by_side"} <= set(names)
    for name, script in names.items():
        begin, end = f"<!-- benchmark:{name} begin -->", f"<!-- benchmark:{name} end -->"
        assert begin in text and end in text, f"{script}: no section {name!r}"
        body = text[text.index(begin) + len(begin):text.index(end)]
        assert "limit" in body or "GB/s" in body, f"{script}: section {name!r} is empty"
