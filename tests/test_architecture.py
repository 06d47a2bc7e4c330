"""The house (docs/architecture.md): the import contracts hold, the import graph has no cycle, no module is too long.

The contracts are in pyproject.toml ([tool.importlinter]); .ci/run also runs `lint-imports` before pytest, so that a
broken contract fails fast. The light-client contract (the client's generation path imports neither torch nor
transformers) runs apart, from tests/light_client_imports.toml.
"""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # the venv's, installed by the test extra
MAX_LINES = 400
MAX_FUNCTION_LINES = 80
CODE_FOLDERS = ("stip", "bench")  # the package, and the benchmark suite run from a checkout

# Modules allowed over MAX_LINES for good: rule tables and generated data, one job however long. None today.
RULE_TABLES: dict[str, str] = {}



def _lint_imports(*config):
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the test extra (scripts/install.sh --test)")
    result = subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *config], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    print(result.stdout, result.stderr)
    return result


def test_import_contracts_hold():
    """Layers (cli, demo > audit, bench > the parties > common > errors) and the parties' independence."""
    result = _lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_light_client_generation_path_is_free_of_torch_and_transformers():
    """The light client (tests/light_client_imports.toml; tests/test_light_client.py runs it without torch)."""
    result = _lint_imports("tests/light_client_imports.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def _cycles(graph):
    """The graph's strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.find_modules_directly_imported_by(target)))))
                    break
                if target in on_stack:
                    low[module] = min(low[module], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == module:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_import_graph_has_no_cycles(monkeypatch):
    """Every import counts, those inside functions too; bench/ (run as `python -m bench...`) is in the graph."""
    import grimp

    monkeypatch.syspath_prepend(str(REPO))
    packages = ["stip"] + (["bench"] if (REPO / "bench" / "__init__.py").exists() else [])
    graph = grimp.build_graph(*packages, cache_dir=None)
    cycles = _cycles(graph)
    for members in cycles:
        print("import cycle:", " <-> ".join(members))
        for module in members:
            for target in sorted(graph.find_modules_directly_imported_by(module) & set(members)):
                lines = sorted({d["line_number"] for d in graph.get_import_details(importer=module, imported=target)})
                print(f"    {module} -> {target} (l.{', l.'.join(map(str, lines))})")
    print(f"import cycles: {len(cycles)}")
    assert cycles == []


def _python_files():
    for folder in CODE_FOLDERS:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_no_module_is_over_400_lines():
    """One job per module: a module over MAX_LINES does several. Rule tables and generated data may be longer, listed
    in RULE_TABLES with their reason."""
    sizes = {path.relative_to(REPO).as_posix(): len(path.read_text().splitlines()) for path in _python_files()}
    over = {path: lines for path, lines in sizes.items() if lines > MAX_LINES and path not in RULE_TABLES}
    print(f"{len(sizes)} modules; the longest: {max(sizes.values())} lines")
    assert over == {}, f"over {MAX_LINES} lines: split by job, or list a rule table with its reason"


def test_no_function_is_over_80_lines():
    """A function over MAX_FUNCTION_LINES (docstring included) does several jobs: name its steps."""
    import ast

    over = {}
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    over[f"{path.relative_to(REPO).as_posix()}:{node.name}"] = lines
    assert over == {}, f"functions over {MAX_FUNCTION_LINES} lines: split them into named steps"
