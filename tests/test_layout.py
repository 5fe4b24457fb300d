"""The package's shape: imports run one way (cli -> runner -> stages -> primitives), no circle, small modules.

Every ``import`` of the package is read from the source (module level and inside functions alike),
with the package ``__init__`` that importing a submodule runs. ``python -m pytest tests/test_layout.py``
is the command that checks it; a new folder must be given a tier in ``FOLDER_TIERS`` below.

The docs are checked here too: ``docs/layout.md`` lists every module with its tier, README.md stays under
``README_MAX_LINES`` and links every ``docs/*.md`` page, and every relative link of those pages resolves.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "unipruning_cli"
MAX_LINES = 400
README = PACKAGE.parent / "README.md"
DOCS = PACKAGE.parent / "docs"
README_MAX_LINES = 250  # the page a newcomer reads in five minutes; the rest lives in docs/

#: The tier of each folder of the package: every module in it (its ``__init__`` too) has that tier, so a folder holds
#: one tier. An import may go to its own tier or a lower one, never a higher one.
FOLDER_TIERS = {
    "": 3,  # cli.py, __main__.py (and the package's __init__: its version, imported by no module of the package)
    # commands that sequence stages
    "commands": 2,
    # stages: each builds one step of a run from primitives; the methods are stages too (their masks run stages)
    "stages": 1, "stages.export": 1, "stages.plan": 1, "methods": 1,
    # primitives
    "core": 0, "data": 0, "models": 0, "pruning": 0, "metrics": 0, "search": 0, "evaluation": 0,
}
#: At most about a dozen entries at the top of the package (files and folders).
TOP_MAX_ENTRIES = 13
NAMES = {"cli": "cli", 2: "runner", 1: "stage", 0: "primitive"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = importer.split(".") if importer else []
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (relative names, "" for the package itself)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    if not (node.module or "").startswith("unipruning_cli"):
                        continue
                    base = node.module[len("unipruning_cli"):].lstrip(".")
                else:
                    base = _resolve(name, path.name == "__init__.py", node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    targets.add(sub if sub in modules else base)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("unipruning_cli"):
                        targets.add(alias.name[len("unipruning_cli"):].lstrip("."))
        # importing a.b.c first runs the __init__ of a and a.b (unless the importer lives inside them)
        for t in list(targets):
            parts = t.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and not (name + ".").startswith(parent + "."):
                    targets.add(parent)
        graph[name] = {t for t in targets if t != name and t != ""}
    return graph


def folder_of(module: str) -> str:
    """The folder a module lives in, dotted ("" for the package's top): a package's __init__ lives in its own."""
    path = _modules()[module]
    return ".".join(path.parent.relative_to(PACKAGE).parts)


def tier(module: str) -> int:
    return FOLDER_TIERS[folder_of(module)]


def test_every_folder_has_a_tier_and_holds_that_tier_alone():
    """A module's tier is its folder's, with no exception: a module of another tier belongs in another folder."""
    folders = {".".join(p.relative_to(PACKAGE).parts) for p in [PACKAGE, *PACKAGE.rglob("*")]
               if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))}
    assert folders == set(FOLDER_TIERS), (f"folders without a tier in tests/test_layout.py: {sorted(folders - set(FOLDER_TIERS))}; "
                                          f"tiers of folders that are gone: {sorted(set(FOLDER_TIERS) - folders)}")
    for folder in folders:
        assert (PACKAGE.joinpath(*folder.split(".")) / "__init__.py").is_file(), f"{folder or 'unipruning_cli'} is no package"


def test_commands_stages_and_primitives_have_folders_of_their_own():
    tiers_of = {}
    for folder, t in FOLDER_TIERS.items():
        tiers_of.setdefault(t, []).append(folder)
    assert tiers_of[2] == ["commands"]  # every command in one place
    assert all(f.startswith("stages") or f == "methods" for f in tiers_of[1])
    entries = [p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= TOP_MAX_ENTRIES, f"unipruning_cli/ holds {len(entries)} entries: {sorted(entries)}"


def test_imports_never_run_up_the_tiers():
    upward = [f"{a} ({NAMES[tier(a)] if tier(a) < 3 else 'cli'}) imports {b} ({NAMES[tier(b)] if tier(b) < 3 else 'cli'})"
              for a, targets in import_graph().items() for b in sorted(targets) if tier(b) > tier(a)]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that starts and ends at the same module), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_there_is_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_lazy_relative_and_parent_imports():
    graph = import_graph()
    assert "core.progress" in graph["cli"]  # a function-local import
    assert "stages.search_store" in graph["stages.search"]  # a relative import
    assert "stages" in graph["commands.prune"]  # stages.search runs stages/__init__ first
    assert "core.config" in graph["stages.preflight"]


@pytest.mark.parametrize("module", sorted(_modules()))
def test_modules_are_small_and_say_their_job(module):
    path = _modules()[module]
    source = path.read_text()
    lines = source.count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (at most {MAX_LINES})"
    doc = ast.get_docstring(ast.parse(source))
    if source.strip():
        assert doc and doc.splitlines()[0].strip(), f"{path.relative_to(PACKAGE.parent)}: the first line of its docstring says its job"


def test_the_layout_page_lists_every_module_and_no_other():
    import re

    table = (DOCS / "layout.md").read_text()  # the module table, linked from the README
    listed = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            listed |= set(re.findall(r"`([\w/]+\.py)`", row.split("|")[1]))
    actual = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert listed == actual, f"missing from docs/layout.md: {sorted(actual - listed)}; gone: {sorted(listed - actual)}"
    for row in table.splitlines():  # the tier the page gives is the tier the test holds
        if row.startswith("| `"):
            cells = [c.strip() for c in row.split("|")]
            for path in re.findall(r"`([\w/]+\.py)`", cells[1]):
                module = _module_name(PACKAGE / path)
                assert cells[2] == (NAMES[tier(module)] if tier(module) < 3 else "cli"), (path, cells[2])


def _markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, code marks and punctuation dropped, spaces to hyphens."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(page: Path) -> list[str]:
    """The targets of a page's markdown links, code blocks and code spans left out (``[0.5,0.6]`` is no link)."""
    import re

    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_readme_is_short_and_links_every_docs_page():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in _links(README) if not t.startswith(("http:", "https:", "#"))}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no page"
    missing = [p.name for p in pages if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_relative_links_point_to_files_that_exist(page):
    import re

    bad = []
    for target in _links(page):
        if target.startswith(("http:", "https:", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md":
            text = re.sub(r"```.*?```", "", file.read_text(), flags=re.S)  # a shell comment is no heading
            headings = [l.lstrip("#") for l in text.splitlines() if l.startswith("#")]
            if anchor not in {_anchor(h) for h in headings}:
                bad.append(f"{target} (no such heading in {file.name})")
    assert not bad, f"{page.relative_to(PACKAGE.parent)}: broken links: {bad}"
