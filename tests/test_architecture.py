"""Architecture rules of the package, checked from source with `ast` only.

Nothing here imports the modules under test (no jax, no tensorflow): the tests read files,
so they stay fast and also catch imports hidden inside functions, which an import-time
check would miss.
"""
import ast
import collections
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("ssr_jax", "tasks")
Import = collections.namedtuple("Import", "name lineno")  # name: absolute, dotted


def _py_files(*dirs):
    """.py files under `dirs`, skipping caches and hidden folders (what git would track)."""
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                yield rel


def _module_name(rel):
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(rel, module):
    """Every import in the file (whole AST, so also inside functions), made absolute.

    `from a import b` yields both `a` and `a.b`: whether `b` is a module is decided later."""
    package = module if rel.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse((ROOT / rel).read_text(), str(rel))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno), None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: strip level-1 components off the package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield Import(base, node.lineno), alias.name


def _load():
    """modules: name -> file; edges: (src, dst) -> [lines]; raw: name -> [Import]."""
    modules = {_module_name(rel): rel for rel in _py_files(*PACKAGES)}
    edges, raw = collections.defaultdict(list), {}
    for mod, rel in modules.items():
        raw[mod] = []
        for imp, member in _imports(rel, mod):
            if member is None:  # `import a.b.c`: the longest known prefix
                parts = imp.name.split(".")
                prefixes = (".".join(parts[:i]) for i in range(len(parts), 0, -1))
                dst = next((p for p in prefixes if p in modules), None)
                raw[mod].append(imp)
            else:  # `from a.b import c`: a.b.c if it is a module, else a.b
                full = f"{imp.name}.{member}" if imp.name else member
                dst = full if full in modules else imp.name if imp.name in modules else None
                raw[mod] += [imp, Import(full, imp.lineno)]
            if dst is not None and dst != mod:
                edges[(mod, dst)].append(imp.lineno)
    return modules, dict(edges), raw


MODULES, EDGES, RAW_IMPORTS = _load()


def _graph(edges):
    graph = collections.defaultdict(set)
    for src, dst in edges:
        graph[src].add(dst)
    return graph


def find_cycles(graph):
    """Cycles of `graph` (node -> successors): Tarjan's SCCs, then for every node of a
    non-trivial SCC the shortest cycle through it (deduplicated), so that every cyclic
    dependency shows up as a concrete `a -> b -> a` path."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            sccs.append(scc)

    nodes = set(graph) | {w for ws in graph.values() for w in ws}
    for v in sorted(nodes):
        if v not in index:
            strongconnect(v)
    cycles, seen = [], set()
    for scc in sccs:
        if len(scc) == 1 and next(iter(scc)) not in graph.get(next(iter(scc)), ()):
            continue
        for start in sorted(scc):  # BFS inside the SCC back to `start`
            parent, frontier, path = {start: None}, [start], None
            while frontier and path is None:
                nxt = []
                for v in frontier:
                    for w in sorted(graph.get(v, ())):
                        if w == start:
                            path = [v]
                            while parent[path[-1]] is not None:
                                path.append(parent[path[-1]])
                            path = path[::-1] + [start]
                            break
                        if w in scc and w not in parent:
                            parent[w] = v
                            nxt.append(w)
                    if path:
                        break
                frontier = nxt
            key = frozenset(zip(path, path[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(path)
    return cycles


def _where(src, dst):
    return f"{MODULES[src]}:{','.join(map(str, EDGES[(src, dst)]))}"


def test_import_graph_sees_known_edges():
    # Guards against the other tests passing vacuously (e.g. a broken resolver finds nothing).
    assert len(MODULES) > 30, sorted(MODULES)
    assert ("ssr_jax.models.encoder_decoder", "ssr_jax.models.config") in EDGES
    assert "tasks" in MODULES and "ssr_jax.models" in MODULES  # __init__ -> package name
    assert any(imp.name == "jax" for imps in RAW_IMPORTS.values() for imp in imps)


def test_cycle_finder_on_hand_made_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    cycles = find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}})
    assert ["a", "b", "c", "a"] in cycles and ["e", "e"] in cycles
    assert not any("d" in c for c in cycles)


def test_no_import_cycles():
    cycles = find_cycles(_graph(EDGES))
    msg = []
    for cyc in cycles:
        msg.append(" -> ".join(cyc))
        msg += [f"    {a} -> {b}  ({_where(a, b)})" for a, b in zip(cyc, cyc[1:])]
    assert not cycles, "import cycles:\n" + "\n".join(msg)


# Lower number = lower layer. A rule `x` covers module `x` and everything under it, so a
# package's __init__ counts with its package. `ssr_jax` itself (its __init__) is layer 0:
# importing any ssr_jax.* module runs it, so it must stay as light as the lowest layer.
LAYER_RULES = {
    "ssr_jax": 0, "ssr_jax.errors": 0, "ssr_jax.vocab": 0, "ssr_jax.host_malloc": 0,
    "ssr_jax.models": 1, "ssr_jax.data": 1, "ssr_jax.partitioning": 1,
    "ssr_jax.distributed": 1,
    "ssr_jax.train": 2, "ssr_jax.ssr": 2, "ssr_jax.plan": 2, "ssr_jax.hf": 2,
    "ssr_jax.compare": 2,
    "ssr_jax.cli": 3, "tasks": 3,
}


def _layer(module):
    if module == "ssr_jax":
        return LAYER_RULES["ssr_jax"]
    # Top-level ssr_jax.<x> modules need their own rule: the bare `ssr_jax` rule is exact.
    for rule in sorted(LAYER_RULES, key=len, reverse=True):
        if rule != "ssr_jax" and (module == rule or module.startswith(rule + ".")):
            return LAYER_RULES[rule]
    return None


def test_layers_point_one_way():
    unassigned = sorted(m for m in MODULES if _layer(m) is None)
    bad = [f"  {s} ({_layer(s)}) -> {d} ({_layer(d)})  {_where(s, d)}"
           for s, d in sorted(EDGES)  # edges of unassigned modules wait for their rule
           if None not in (_layer(s), _layer(d)) and _layer(d) > _layer(s)]
    msg = [f"  {m} ({MODULES[m]})" for m in unassigned]
    msg = (["modules without a layer; add them to LAYER_RULES deliberately:"] + msg
           if msg else []) + (["imports of a higher layer:"] + bad if bad else [])
    assert not msg, "\n".join(msg)


def _offending(prefixes, allowed):
    """file:line of every import of `prefixes` (or their submodules) by a module for which
    `allowed(module)` is false."""
    hits = sorted({(str(MODULES[mod]), imp.lineno, imp.name)
                   for mod, imps in RAW_IMPORTS.items() if not allowed(mod) for imp in imps
                   if any(imp.name == p or imp.name.startswith(p + ".") for p in prefixes)})
    return [f"  {path}:{line} imports {name}" for path, line, name in hits]


def _under(mod, package):
    return mod == package or mod.startswith(package + ".")


def test_only_the_edge_imports_gin_argparse_and_tasks():
    # Configuration and command lines are the edge's business: the library takes arguments.
    # ssr_jax.cli counts as the edge whether it is ssr_jax/cli/ or (for now) ssr_jax/cli.py;
    # only ssr_jax/ is checked (tasks/ is an edge itself).
    hits = _offending(("gin", "argparse", "tasks"),
                      lambda m: not _under(m, "ssr_jax") or _under(m, "ssr_jax.cli"))
    assert not hits, "gin/argparse/tasks imported outside ssr_jax/cli/:\n" + "\n".join(hits)


def test_only_partitioning_and_distributed_use_multihost_utils():
    # Multi-host collectives must stay in the two modules that own lockstep across hosts.
    allowed = {"ssr_jax.partitioning", "ssr_jax.distributed"}
    hits = _offending(("jax.experimental.multihost_utils",), allowed.__contains__)
    assert not hits, "multihost_utils used outside partitioning/distributed:\n" + "\n".join(hits)


def test_no_python_file_over_600_lines():
    long = [f"  {rel}: {n} lines" for rel in _py_files("ssr_jax", "tasks", "tests", "bench")
            if (n := len((ROOT / rel).read_text().splitlines())) > 600]
    assert not long, "files over 600 lines (split them):\n" + "\n".join(long)


def test_code_cites_only_files_in_the_repository():
    # DESIGN.md and ../shared are not in the repository: facts the code relies on live in docs/.
    files = [ROOT / "README.md"]
    for d in ("ssr_jax", "tasks", "gin", "docs"):
        files += sorted(p for ext in ("py", "gin", "md") for p in (ROOT / d).rglob(f"*.{ext}")
                        if "__pycache__" not in p.parts)
    hits = [f"  {path.relative_to(ROOT)}:{i}: {line.strip()}"
            for path in files if path.exists()
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if "DESIGN.md" in line or "../shared" in line]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_model_step_and_teacher_import_without_tensorflow_seqio_gin():
    # The GPU image has none of them: what runs there must import without them.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'seqio', 'gin', 'tensorflow_datasets'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ssr_jax.models.encoder_decoder, ssr_jax.train.steps, ssr_jax.ssr.teacher\n"
        "import ssr_jax.partitioning, ssr_jax.distributed, ssr_jax.train.checkpoints\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
