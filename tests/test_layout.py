"""The project's layout rules: no import circle, tessera_kernels/ and models/ never reach up into engine/, engine/'s top
level holds only entry points and the config, every entry point runs as a script and as a module, and nothing points
outside the repository."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tessera_kernels", "models", "engine")
ENTRY_POINTS = ("train", "sample", "evaluate", "precompute", "convert", "debias", "fewshot")
TOP_LEVEL_ALLOWED = {"__init__", *ENTRY_POINTS}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (functions included), except under `if TYPE_CHECKING:`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from engine.data import precompute`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    assert len(graph) > 50 and graph["engine.train"], "the walker found no modules or no imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_and_models_never_import_engine():
    for name, deps in import_graph().items():
        if name.startswith("tessera_kernels"):
            assert not {d for d in deps if d.startswith(("models", "engine"))}, name
        if name.startswith("models"):
            assert not {d for d in deps if d.startswith("engine")}, name


def test_no_installed_distribution_claims_our_top_level_names():
    """A top-level package that shares its name with another installed distribution's (transformers requires one
    called `kernels`) makes whichever is imported first win in sys.modules, and the other's imports break."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    clashes = {pkg: owners[pkg] for pkg in PACKAGES if set(owners.get(pkg, ())) - {"tessera"}}
    assert not clashes, f"top-level names claimed by other distributions: {clashes}"


def test_engine_top_level_holds_only_entry_points_and_config():
    loose = {p.stem for p in (ROOT / "engine").glob("*.py")} - TOP_LEVEL_ALLOWED
    assert not loose, f"library modules belong in a room under engine/: {sorted(loose)}"


def test_entry_points_import_nothing_from_each_other():
    graph = import_graph()
    for ep in ENTRY_POINTS:
        others = {f"engine.{o}" for o in ENTRY_POINTS if o != ep}
        assert not graph[f"engine.{ep}"] & others, ep


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    bad, shared = [], "shared"  # the needles are built here, so this file does not match itself
    for f in tracked:
        if f.endswith((".py", ".md", ".yaml", ".sh", ".toml", ".ini")) and (ROOT / f).is_file():
            text = (ROOT / f).read_text(errors="replace")
            if f"../{shared}" in text or f"{shared}/DESIGN" in text:
                bad.append(f)
    assert not bad, bad


def test_design_doc_exists_and_names_every_room():
    doc = (ROOT / "docs" / "DESIGN.md").read_text()
    rooms = [p.name for p in (ROOT / "engine").iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    missing = [r for r in rooms if f"{r}/" not in doc]
    assert not missing, f"docs/DESIGN.md does not describe engine rooms {missing}"


DOC_PATH = re.compile(r"\]\(([^)#\s]+)[^)]*\)|\b(docs/[\w/.-]+\.md)\b")


def broken_doc_paths(text: str, base: Path, markdown: bool = True) -> list[str]:
    """Markdown link targets (relative to `base`; only if `markdown`) and docs/...md paths (relative to the root) in
    `text` that do not exist. Web links are not checked."""
    bad = []
    for m in DOC_PATH.finditer(text):
        link, doc = m.groups()
        if link and markdown and not link.startswith(("http://", "https://", "mailto:")) and not (base / link).exists():
            bad.append(link)
        if doc and not (ROOT / doc).exists():
            bad.append(doc)
    return bad


def test_broken_doc_path_finder_finds_planted_ones():
    text = "[a](docs/DESIGN.md) [b](docs/nowhere.md) see docs/results/none.md, [c](https://x.org/y.md)"
    assert broken_doc_paths(text, ROOT) == ["docs/nowhere.md", "docs/results/none.md"]
    assert broken_doc_paths("f(x)[0](docs/results/none.md)", ROOT, markdown=False) == []  # code, not a link


def test_every_doc_link_and_docs_path_resolves():
    """The README's summaries point into docs/results/; a moved or renamed page must not leave a dead link behind."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("configs/*.yaml")),
             *(p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")))]
    bad = {str(f.relative_to(ROOT)): b for f in files
           if (b := broken_doc_paths(f.read_text(), f.parent, markdown=f.suffix == ".md"))}
    assert not bad, bad


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_runs_as_script_and_as_module(entry):
    """`python engine/X.py --help` from anywhere and `python -m engine.X --help` both work."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "engine" / f"{entry}.py"), "--help"], cwd="/",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen([sys.executable, "-m", f"engine.{entry}", "--help"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "usage:" in out
