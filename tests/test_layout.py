"""The package layout is the architecture: packages by role, imports pointing one way, no cycle (lazy imports inside
functions included), so any module can be read with only what sits below it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "kscope"


def _package(module: str) -> str:
    """``kscope.privacy.edit.keyed`` -> ``privacy.edit``; ``kscope.locate.compare`` -> ``locate``; ``kscope.stats`` ->
    ``stats``; ``kscope`` (its ``__version__``) -> ``kscope``."""
    parts = module.split(".")[1:]
    if not parts:
        return "kscope"
    return ".".join(parts[:2]) if parts[0] == "privacy" and len(parts) > 1 else parts[0]


def package_imports() -> dict[str, set[str]]:
    """Every package's imports of other kscope packages, from every ``import`` in its modules (top level or not)."""
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        module = ".".join(("kscope", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        src = _package(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name == "kscope" or name.startswith("kscope."):
                    tgt = _package(name)
                    if tgt != src:
                        edges.setdefault(src, set()).add(tgt)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return path + [n, m]
            if m not in state and (found := visit(m, path + [n])):
                return found
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n, [])):
            return found
    return None


def test_no_package_imports_itself_back():
    assert _cycle(package_imports()) is None, " -> ".join(_cycle(package_imports()))


def test_imports_point_down_the_roles():
    """app is imported by nothing; analyses and privacy never by the packages below them; privacy's study and forget
    (the jobs) by no other privacy package; the shared leaves (facts, stats, config, results, io) import no role."""
    edges = package_imports()
    importers = lambda target: {s for s, ts in edges.items() if target in ts}  # noqa: E731
    assert importers("app") <= {"__main__"}
    assert not importers("analyses") - {"app"}
    assert not {s for p in ("privacy.data", "privacy.locate", "privacy.edit", "privacy.judge", "privacy.study", "privacy.forget")
                for s in importers(p)} - {"app", "privacy.data", "privacy.locate", "privacy.edit", "privacy.judge", "privacy.study",
                                          "privacy.forget"}
    assert importers("privacy.study") <= {"app"} and importers("privacy.forget") <= {"app"}
    roles = {"model", "units", "locate", "analyses", "app"} | {s for s in edges if s.startswith("privacy")}
    for leaf in ("stats", "config", "results", "io", "errors", "numerics"):
        assert not edges.get(leaf, set()) & roles, leaf
    assert not edges.get("facts", set()) & (roles - {"model"})  # the known filter runs the model; nothing above it
