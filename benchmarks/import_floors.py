"""How well the floors hold: imports that run back up a layer (import-linter's layers contract), module circles
(strongly connected groups of the import graph) and import statements inside functions, for the current tree
or an earlier commit (checked out into a temporary git worktree).

    python benchmarks/import_floors.py                 # this tree
    python benchmarks/import_floors.py --rev 4a4b50b   # before issue 31
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def graph(src: Path) -> tuple[dict[str, set[str]], int, int, int]:
    """(module -> imported imagine modules, statements in functions outside cli/, in functions, at module level)."""
    pkg = src / "imagine"
    mods = {}
    for p in pkg.rglob("*.py"):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    edges: dict[str, set[str]] = defaultdict(set)
    library_inner = inner = top = 0
    for name, p in mods.items():
        tree = ast.parse(p.read_text())
        in_fn = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_fn |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for n in ast.walk(tree):
            if not isinstance(n, (ast.Import, ast.ImportFrom)):
                continue
            if id(n) in in_fn:
                inner += 1
                library_inner += "/cli/" not in str(p)
            else:
                top += 1
            if isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    here = name.split(".") if p.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - n.level + 1] + ([n.module] if n.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in n.names]
            else:
                targets = [a.name for a in n.names]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    edges[name].add(t)
    return edges, library_inner, inner, top


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def report(src: Path) -> None:
    edges, library_inner, inner, top = graph(src)
    groups = circles(edges)
    print(f"module circles: {len(groups)}")
    for g in groups:
        print("  " + " <-> ".join(g))
    print(f"import statements: {top} at module level, {inner} in functions ({library_inner} outside cli/)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", help="an earlier commit to measure instead of this tree")
    args = ap.parse_args()
    if args.rev is None:
        report(ROOT / "src")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), args.rev], cwd=ROOT, check=True)
        try:
            report(tree / "src")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
