"""The import layers of docs/architecture.md, checked on the source (AST; nothing is imported): no import circle among
ebmscale modules, no import up the table below, and no ebmscale import inside a function (an in-function import is for
an optional, heavy third-party dependency only). A new module must be given a layer here."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ebmscale"
LAYERS = {  # module or package -> layer; a module imports its own layer or lower ones; the longest name wins
    "ebmscale.log": 0, "ebmscale.progress": 0, "ebmscale.config": 0, "ebmscale.distributed": 0, "ebmscale.precision": 0,
    "ebmscale.program": 0, "ebmscale.trust": 0,
    "ebmscale.models": 1, "ebmscale.sampling": 1, "ebmscale.buffer": 1, "ebmscale.reservoir": 1, "ebmscale.data": 1,
    "ebmscale.train.faults": 2, "ebmscale.train.checkpoint": 2, "ebmscale.train.heartbeat": 2, "ebmscale.train.stop": 2,
    "ebmscale.train.runlock": 2, "ebmscale.eval.loading": 2, "ebmscale.run_status": 2, "ebmscale": 2,  # the package
    "ebmscale.train": 3, "ebmscale.eval": 3, "ebmscale.tracking": 3, "ebmscale.export": 3,
    "ebmscale.train.main": 4,
    "ebmscale.launch": 5, "ebmscale.commands": 5, "ebmscale.bench": 5, "ebmscale.cli": 5, "ebmscale.__main__": 5,
    "ebmscale.tracking.__main__": 5,
}
MODULES = {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in PKG.rglob("*.py")}


def layer(mod: str) -> int:
    names = [k for k in LAYERS if mod == k or (k != "ebmscale" and mod.startswith(k + "."))]
    assert names, f"{mod} has no layer: add it to LAYERS in tests/test_layers.py and to docs/architecture.md"
    return LAYERS[max(names, key=len)]


def imports(mod: str):
    """(imported ebmscale module, line, inside a function?) for every import statement of `mod`."""
    tree, pkg = ast.parse(MODULES[mod].read_text()), mod if MODULES[mod].name == "__init__.py" else mod.rpartition(".")[0]
    in_fn = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        yield from ((t, node.lineno, id(node) in in_fn) for t in targets if t in MODULES)


def test_imports_point_down_with_no_circle_and_none_inside_a_function():
    graph, bad = {m: set() for m in MODULES}, []
    for mod in MODULES:
        for target, line, in_fn in imports(mod):
            where = f"{MODULES[mod].relative_to(PKG.parent)}:{line} imports {target}"
            if in_fn:
                bad.append(f"{where} inside a function: import it at the top (move shared code down a layer)")
            elif layer(target) > layer(mod):
                bad.append(f"{where}, layer {layer(target)} above its own {layer(mod)}: move what it needs down")
            graph[mod].add(target)
    state = {}  # depth-first search; an edge back to a module still on the stack closes a circle

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m] - {m}):
            if state.get(t) == "open":
                bad.append("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"
    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not bad, "\n".join(bad)
