"""The library's module graph has no import circle: every `import` of a pipeline module, at the top of a
file or inside a function, read from the source with ast (nothing is imported to check it)."""

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The pipeline modules `path` imports: `from a.b import c` is a.b.c when that is a module, else a.b."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .a import b
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != me}


def graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {m: imports_of(p, modules) for m, p in modules.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    g = graph()
    assert "pipeline.shards.storage.objstore" in g["pipeline.shards.cache"]  # imports are seen at all
    assert "pipeline.shards.cache" in g["pipeline.shards.splits"]  # ... inside functions too


def test_no_two_library_modules_import_each_other_in_a_circle():
    assert cycles(graph()) == []


def test_shard_writing_and_loading_live_apart():
    """pipeline.data (loading, augmentation, crops, sampling, scan) may read shards; the shards package
    (format, sources, job, storage, cache) never reaches into loading."""
    g = graph()
    for m, deps in g.items():
        if m.startswith("pipeline.shards"):
            assert not [d for d in deps if d.startswith("pipeline.data")], (m, deps)
