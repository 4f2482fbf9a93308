"""The import structure of :mod:`sde`: no cycles, each layer imports only the layers below it,
and the theory never reaches :mod:`shaped_attn` (imports inside functions count)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sde", "shaped_attn")
LAYERS = {"sde._helpers": 0, "sde._theory": 1, "sde._mc": 2, "sde._estimator": 3, "sde._compare": 3,
          "sde._experiment": 4, "sde": 5}
"""Layer of every module of :mod:`sde`: the longest matching prefix."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module imported anywhere in the file (functions included);
    ``from X import y`` counts as ``X.y`` when that is a module, else ``X``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = modules()
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports(name, path) if m in known and m != name} for name, path in known.items()}


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def find_cycle(g: dict[str, set[str]]):
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(g):
        if u not in state and (c := visit(u)):
            return c
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_detector_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_each_layer_imports_only_layers_below():
    bad = [f"{u} (layer {layer(u)}) imports {v} (layer {layer(v)})"
           for u, targets in graph().items() if u.startswith("sde")
           for v in targets if v.startswith("sde") and layer(v) > layer(u)]
    assert not bad, "\n".join(bad)


def test_theory_never_reaches_shaped_attn():
    g, known = graph(), modules()
    reached, todo = set(), [m for m in g if m.startswith(("sde._helpers", "sde._theory"))]
    while todo:
        u = todo.pop()
        if u not in reached:
            reached.add(u)
            todo += list(g[u])
    offenders = {u: sorted(m for m in imports(u, known[u]) if m.split(".")[0] in ("shaped_attn", "flax"))
                 for u in reached}
    assert not any(offenders.values()), {u: v for u, v in offenders.items() if v}


def test_theory_imports_at_run_time_without_the_module_family():
    code = ("import sys, sde, sde._theory.solve, sde._theory.correlation, sde._theory.noise\n"
            "p = sde.SDEParams(gamma=0.5)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'shaped_attn', 'flax'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["solve", "SDEParams", "run_experiment"])
def test_public_names_resolve_and_api_is_curated(name):
    import sde

    assert name in sde.__all__ and getattr(sde, name) is not None
    assert len(sde.__all__) <= 35
    assert all(not n.startswith("_") for n in sde.__all__)
    with pytest.raises(AttributeError, match="no attribute 'finite'"):
        sde.finite  # noqa: B018  (internals are private)
