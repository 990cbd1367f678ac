"""The package's shape: a small root, no test code shipped, no import circles, a tour whose names exist, and
documented commands that run."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nanogpt_np"
DOCS = [REPO / "README.md", REPO / "docs" / "TOUR.md", REPO / "docs" / "CONTRACTS.md", REPO / "data" / "README.md",
        PACKAGE / "kernels" / "README.md"]


def module_files():
    """{dotted module name: path} for every Python file of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(name, path, modules):
    """The package modules that `name` imports anywhere in its file (module level or inside functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_package_root_is_small():
    root_files = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_files) <= 12, f"the package root holds {len(root_files)} Python files: {root_files}"


def test_no_test_code_in_the_package():
    modules = module_files()
    for name, path in modules.items():
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                bad = [n for n in names if n.split(".")[0] in ("tests", "emulation", "gradcheck", "conftest", "pytest")]
                assert not bad, f"{path.relative_to(REPO)} imports test code: {bad}"
    assert not list(PACKAGE.rglob("fake_*.py")), "test doubles belong under tests/"


def test_no_import_circles():
    modules = module_files()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    # depth-first search for a back edge; report the circle it closes
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                circle = stack[stack.index(n):] + [n]
                pytest.fail("import circle: " + " -> ".join(circle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_import_circle_detector_can_fail(tmp_path, monkeypatch):
    """The detector itself: two modules importing each other (one lazily, inside a function) are found."""
    pkg = tmp_path / "nanogpt_np"
    (pkg / "io").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "io" / "a.py").write_text("from .b import x\n")
    (pkg / "io" / "b.py").write_text("def x():\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_no_import_circles()


# ------------------------------------------------------------------------------------------ docs/TOUR.md

TOUR_NAME = re.compile(r"`(nanogpt_np/[\w/]+\.(?:py|cu)):([\w.]+)`")


def _defined_names(path: Path):
    """Functions, classes and Class.method names defined in a Python file; kernels in a .cu file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".cu":
        return set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", text))
    names = set()
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{f.name}" for f in node.body if isinstance(f, ast.FunctionDef))
    return names


def test_tour_names_exist():
    tour = (REPO / "docs" / "TOUR.md").read_text(encoding="utf-8")
    refs = TOUR_NAME.findall(tour)
    assert len(refs) >= 40, f"the tour names only {len(refs)} file:function places"
    missing = []
    for file, name in refs:
        path = REPO / file
        if not path.exists() or name not in _defined_names(path):
            missing.append(f"{file}:{name}")
    assert not missing, f"docs/TOUR.md names places that do not exist: {sorted(set(missing))}"


def test_tour_name_check_can_fail():
    assert "train" in _defined_names(PACKAGE / "trainer.py")
    assert "no_such_function" not in _defined_names(PACKAGE / "trainer.py")
    assert "layernorm_forward" in _defined_names(PACKAGE / "kernels" / "layernorm.cu")


def test_every_file_path_in_the_docs_exists():
    pattern = re.compile(r"`((?:nanogpt_np|tests|benchmarks|data|docs|examples)/[\w/.-]+\.(?:py|cu|md|sh|html))`")
    missing = []
    for doc in DOCS:
        for path in pattern.findall(doc.read_text(encoding="utf-8")):
            candidates = [REPO / path, doc.parent / path]
            if not any(c.exists() for c in candidates):
                missing.append(f"{doc.relative_to(REPO)}: {path}")
    assert not missing, "documents name files that do not exist:\n" + "\n".join(missing)


# ------------------------------------------------------------------------------------------ documented commands

def documented_commands():
    """Every `python -m nanogpt_np...` module and every `python <script>.py` the docs tell people to run."""
    modules, scripts = set(), set()
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        modules.update(re.findall(r"python3? -m (nanogpt_np[\w.]*)", text))
        scripts.update(s for s in re.findall(r"python3? ((?:[\w-]+/)*[\w-]+\.py)\b", text) if (REPO / s).exists())
    return sorted(modules), sorted(scripts)


def test_documented_commands_are_found():
    modules, scripts = documented_commands()
    assert "nanogpt_np.serve" in modules and "train.py" in scripts and "sample.py" in scripts


@pytest.mark.parametrize("kind_and_name", [("module", m) for m in documented_commands()[0]]
                         + [("script", s) for s in documented_commands()[1]])
def test_documented_command_help_runs(kind_and_name):
    kind, name = kind_and_name
    if name == "nanogpt_np.kernels.compile":
        pytest.skip("prints the nvcc resource table (no --help); covered by tests/test_kernels_compile.py")
    argv = ["-m", name] if kind == "module" else [str(REPO / name)]
    result = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, f"{name} --help failed:\n{result.stderr[-2000:]}"
    assert "usage" in (result.stdout + result.stderr).lower() or len(result.stdout) > 200, result.stdout[:500]
