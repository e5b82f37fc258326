"""The map of docs/architecture.md holds: no module-level import cycles inside bayeslora, and the runner reads no
posterior attribute outside the protocol."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bayeslora"


def _module_graph() -> dict[str, set[str]]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for cand in (target, *(f"{target}.{a.name}" for a in node.names)):
                    if cand in mods and cand != mod:
                        graph[mod].add(cand)
            elif isinstance(node, ast.Import):
                graph[mod].update(a.name for a in node.names if a.name in mods and a.name != mod)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node, path):
        for nxt in graph[node]:
            if nxt in path:
                cycle = path[path.index(nxt) :] + [nxt]
                if not any(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):  # a package's own re-exports
                    found.append(cycle)
            elif nxt not in done:
                done.add(nxt)
                visit(nxt, [*path, nxt])

    for node in graph:
        visit(node, [node])
    return found


def test_no_import_cycles():
    assert _cycles(_module_graph()) == []


def test_the_checker_sees_a_cycle():
    cycles = _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycles and all(set(c) == {"a", "b", "c"} for c in cycles)
    assert _cycles({"pkg": {"pkg.mod"}, "pkg.mod": {"pkg"}}) == []  # a package re-exporting its module


def test_the_runner_reads_no_posterior_attribute_outside_the_protocol():
    tree = ast.parse((PACKAGE / "run.py").read_text())
    protocol = {"needs", "name", "fit", "predict", "config", "state_dict", "load_state_dict"}
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "posterior"
    }
    assert used <= protocol, used - protocol
    assert "getattr(bl.posterior" not in (PACKAGE / "run.py").read_text()


def test_the_registry_is_every_register_of_the_posteriors_package(tmp_path):
    """A method is registered by its own module (a ``REGISTER`` literal), read without importing it."""
    import pytest

    from bayeslora.posteriors import METHODS, discover

    assert discover(PACKAGE / "posteriors", "bayeslora.posteriors") == METHODS
    (tmp_path / "one.py").write_text('import no_such_package\nREGISTER = {"one": "One", "two": ("Two", {"k": 2})}\n')
    (tmp_path / "other.py").write_text("X = 1\n")
    assert discover(tmp_path, "pkg") == {"one": ("pkg.one:One", {}), "two": ("pkg.one:Two", {"k": 2})}
    (tmp_path / "three.py").write_text('REGISTER = {"one": "Again"}\n')
    with pytest.raises(ValueError, match="'one' is registered twice"):
        discover(tmp_path, "pkg")
    (tmp_path / "three.py").write_text('REGISTER = {"three": make()}\n')
    with pytest.raises(TypeError, match="must be a literal dict"):
        discover(tmp_path, "pkg")
