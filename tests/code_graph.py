"""The project's import graph, read from the source (nothing is imported or run).

Edges are every ``import`` and ``from ... import`` anywhere in a module (lazy imports inside
functions included) and every registry entry string ``"package.module:object"``, because that is
code a stage can run. Used by the structure tests and the dvc.yaml dependency test.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "router")
_ENTRY = re.compile(r"^((?:pipelines|router)(?:\.\w+)+):\w+$")


def modules(root: Path = REPO) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def _targets(mods: dict[str, Path], cur: str, node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = cur.split(".")
        if mods[cur].name != "__init__.py":
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    return [base + "." + a.name for a in node.names] + [base]


def graph(root: Path = REPO, registry_strings: bool = True) -> dict[str, set[str]]:
    """module -> project modules it imports (or names in a registry, if ``registry_strings``)."""
    mods = modules(root)
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        tree = ast.parse(f.read_text(), filename=str(f))
        # a package's lazy ``__getattr__`` (router.Router) runs only when that name is used
        tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "__getattr__")]
        for node in ast.walk(tree):
            found: list[str] = []
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found = _targets(mods, m, node)
            elif registry_strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
                hit = _ENTRY.match(node.value)
                found = [hit.group(1)] if hit else []
            for t in found:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                # a package's own submodules importing the package (its __init__) are not edges
                if t and t != m and not m.startswith(t + "."):
                    g[m].add(t)
    return g


def closure(start: str, g: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(g.get(m, ()))
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in g)
    return seen


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    import sys

    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def files_of(mods_: set[str], root: Path = REPO) -> set[str]:
    mods = modules(root)
    return {mods[m].relative_to(root).as_posix() for m in mods_ if m in mods}


# what each stage's dvc.yaml cmd runs
STAGE_ENTRY = {"prepare": "pipelines.prepare", "rollout": "pipelines.rollout.__main__", "label": "pipelines.label",
               "featurize": "pipelines.featurize", "train": "pipelines.train", "evaluate": "pipelines.evaluate",
               "export": "pipelines.export", "feedback": "pipelines.feedback", "drift": "pipelines.drift",
               "recalibrate": "pipelines.recalibrate", "retrain": "pipelines.retrain", "ope": "pipelines.ope"}


def stage_code(stage: str, root: Path = REPO) -> list[str]:
    """Every project file the stage's command can run, sorted: its dvc.yaml code deps."""
    return sorted(files_of(closure(STAGE_ENTRY[stage], graph(root)), root))


def write_dvc_deps(path: Path = REPO / "dvc.yaml") -> None:
    """Rewrite each stage's code deps in dvc.yaml (the `- pipelines/...`/`- router/...` lines of its
    `deps:`) from the import graph, leaving every other line (data deps, params, comments) as it is."""
    import re

    lines, out, stage, in_deps = path.read_text().splitlines(), [], None, False
    for line in lines:
        m = re.match(r"^  (\w+):\s*$", line)
        if m:
            stage, in_deps = m.group(1), False
        if re.match(r"^    deps:\s*$", line):
            in_deps = True
            out.append(line)
            continue
        if in_deps and re.match(r"^      - (pipelines|router)/", line):
            continue  # dropped here, written after the stage's data deps
        if in_deps and not re.match(r"^      - ", line):
            out += [f"      - {f}" for f in stage_code(stage)] if stage in STAGE_ENTRY else []
            in_deps = False
        out.append(line)
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":  # python -m tests.code_graph --dvc [--write]: the code deps of every stage
    import sys

    if sys.argv[1:] == ["--dvc", "--write"]:
        write_dvc_deps()
    elif sys.argv[1:] == ["--dvc"]:
        for s in STAGE_ENTRY:
            print(f"{s}:\n" + "\n".join(f"      - {f}" for f in stage_code(s)))
    else:
        raise SystemExit("usage: python -m tests.code_graph --dvc [--write]")
