"""The library's import graph: no cycles, and no library module importing the CLI (gpt/cli.py).

Walks every `import gpt.x` / `from gpt[.x] import y` in gpt/, at any depth (imports inside functions count:
they are cycles too, only deferred)."""

import ast
from pathlib import Path

GPT_DIR = Path(__file__).resolve().parent.parent / "gpt"
CLI = {"gpt.cli"}


def module_name(path: Path) -> str:
    return "gpt." + path.relative_to(GPT_DIR).with_suffix("").as_posix().replace("/", ".")


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in GPT_DIR.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("gpt.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gpt":
                # `from gpt import data` imports the module gpt.data; `from gpt.data import x` imports gpt.data.
                deps |= ({f"gpt.{a.name}" for a in node.names} if node.module == "gpt" else {node.module})
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None: depth-first search with a path stack."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_library_modules_never_import_the_cli():
    offenders = {m: deps & CLI for m, deps in import_graph().items() if m not in CLI and deps & CLI}
    assert not offenders, offenders


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"gpt.a": {"gpt.b"}, "gpt.b": {"gpt.c"}, "gpt.c": {"gpt.a"}, "gpt.d": set()}
    assert find_cycle(graph) == ["gpt.a", "gpt.b", "gpt.c", "gpt.a"]
    graph["gpt.c"] = {"gpt.d"}
    assert find_cycle(graph) is None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "gpt.trainer" in graph["gpt.cli"]  # imported inside run_train, after the arguments are checked
    assert "gpt.model" in graph["gpt.steps"]
