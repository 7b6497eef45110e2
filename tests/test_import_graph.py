"""The package's module graph: no import cycles (counting imports inside functions and TYPE_CHECKING
blocks too: a cycle there is still two modules that each need the other), emo_stream never imports
server, no model family imports another family, and the shared blocks import no family."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("emo_stream", "server")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)   # `from pkg import module`
        # a module's import of its own package's __init__ is not an edge worth counting
        graph[name] = {t for t in targets if t in files and t != name and not name.startswith(t + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_package_has_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_emo_stream_never_imports_server():
    graph = import_graph()
    offenders = {m: sorted(t for t in ts if t.split(".")[0] == "server") for m, ts in graph.items()
                 if m.startswith("emo_stream")}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_cycle_finder_finds_a_cycle():
    # must-fail case: the check above would be worthless if this did not report the loop
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


FAMILIES = "emo_stream.families"


def family_of_module(name: str) -> str | None:
    """"emo_stream.families.hallo.loader" -> "hallo"; None outside a family's folder."""
    parts = name.split(".")
    return parts[2] if name.startswith(FAMILIES + ".") and len(parts) > 2 else None


def family_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """module -> the modules of OTHER families it imports (the package emo_stream.families itself, which
    declares the Family dataclass, is shared)."""
    out = {}
    for m, targets in graph.items():
        own = family_of_module(m)
        if own is None:
            continue
        other = sorted(t for t in targets if family_of_module(t) not in (None, own))
        if other:
            out[m] = other
    return out


def test_no_family_imports_another_family():
    graph = import_graph()
    assert {family_of_module(m) for m in graph} >= {"preview", "emo", "echomimic", "hallo"}
    assert family_imports(graph) == {}


def test_blocks_import_no_family():
    graph = import_graph()
    blocks = {m: sorted(t for t in ts if t.startswith(FAMILIES)) for m, ts in graph.items()
              if m == "emo_stream.blocks" or m.startswith("emo_stream.blocks.")}
    assert len(blocks) > 1 and {m: t for m, t in blocks.items() if t} == {}


def test_family_packages_import_nothing_heavy():
    """Each family's __init__ only declares FAMILY: listing the families (CLI choices) imports no model code."""
    graph = import_graph()
    inits = {m: ts for m, ts in graph.items() if family_of_module(m) and m.count(".") == 2}
    assert set(inits) >= {f"{FAMILIES}.{n}" for n in ("preview", "emo", "echomimic", "hallo")}
    assert {m: sorted(ts - {FAMILIES}) for m, ts in inits.items() if ts - {FAMILIES}} == {}
    import subprocess
    import sys

    code = ("import sys, emo_stream.registry as r; r.family_names(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_the_family_check_finds_a_cross_family_import():
    # must-fail case: a family module importing another family's module is reported, the shared package is not
    graph = {"emo_stream.families.hallo.backend": {"emo_stream.families.emo.backend", "emo_stream.families",
                                                   "emo_stream.blocks.device"},
             "emo_stream.families.emo.backend": {"emo_stream.families.emo.model"}}
    assert family_imports(graph) == {"emo_stream.families.hallo.backend": ["emo_stream.families.emo.backend"]}


def test_the_optional_integrations_import_without_their_extras():
    """emo_stream.livekit and emo_stream.pipecat import without livekit/pipecat; touching a name says what to
    install, and a name they do not export is an AttributeError (hasattr and tab completion rely on it)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['livekit'] = sys.modules['pipecat'] = None\n"
            "import emo_stream.livekit as lk, emo_stream.pipecat as pc\n"
            "for name in ('lk.AvatarSession', 'pc.EmoStreamVideoService'):\n"
            "    try:\n        eval(name)\n    except ImportError as e:\n        print(e)\n"
            "print(hasattr(lk, 'Nothing'), hasattr(pc, 'Nothing'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        'emo_stream.livekit.AvatarSession needs the livekit packages: pip install "emo-stream[livekit]"',
        'emo_stream.pipecat.EmoStreamVideoService needs pipecat: pip install "emo-stream[pipecat]"',
        "False False"]
