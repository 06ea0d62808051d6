"""No import cycles among tinygen's modules: every import statement (function-level ones included), read by ast."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """module -> the tinygen modules it imports ("tinygen.eval.sweep"; a package is its __init__)."""
    files = {}
    for f in sorted((ROOT / "tinygen").rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def resolve(name):  # "tinygen.loader.load_model" -> "tinygen.loader"
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, f in files.items():
        package = module if f.name == "__init__.py" else module.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb level - 1 packages up from this one
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + [base] if base else up)
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {r for r in map(resolve, names) if r and r != module}
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_resolves_relative_and_function_level_imports():
    g = import_graph()
    assert "tinygen.checkpoint" in g["tinygen.loader"] and "tinygen.checkpoint" in g["tinygen.quant"]
    assert "tinygen.eval.runner" in g["tinygen.eval.calibrate"]  # imported inside a function


def test_no_import_cycles():
    assert cycles(import_graph()) == []
