"""Which way the arrows point between the package's rooms (../shared/DESIGN.md): every import of the
project's own modules, at module level or inside a function, read from the source. No room imports the
trainer but the entry points; the teacher needs nothing of the trainer; the loss sees tensors and groups
only; data has no torch.distributed; the rooms form no cycle."""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("megatron_opd", "checkpoint_tools")
ENTRY_POINTS = {"train", "generate", "doctor"}
NEVER = {  # room -> rooms it must not import
    "loss": {"models", "rollout", "trainer", "teacher"},
    "teacher": {"trainer"},
    "data": {"trainer", "teacher", "rollout", "models", "loss"},
    "checkpoint_tools": {"trainer", "rollout", "teacher"},
    "models": {"trainer", "teacher", "rollout"},
    "rollout": {"trainer", "teacher", "demo"},
    "config": {"trainer", "teacher"},
}


def room(module: str) -> str:
    """megatron_opd.loss.fused -> loss; megatron_opd.config -> config; checkpoint_tools.x -> checkpoint_tools."""
    parts = module.split(".")
    return parts[0] if parts[0] == "checkpoint_tools" else parts[1]


def imports() -> tuple[set, dict]:
    """(the rooms read, room -> {imported room: [file:line, ...]}) over both packages' sources."""
    rooms, found = set(), {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            if module == "megatron_opd":
                continue
            source = room(module)
            rooms.add(source)
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                         else [])
                for name in names:
                    if name.split(".")[0] in PACKAGES and name != "megatron_opd" and room(name) != source:
                        where = f"{path.relative_to(REPO)}:{node.lineno}"
                        found.setdefault(source, {}).setdefault(room(name), []).append(where)
                    elif name == "torch.distributed" or name.startswith("torch.distributed."):
                        found.setdefault(source, {}).setdefault("torch.distributed", []).append(
                            f"{path.relative_to(REPO)}:{node.lineno}")
    return rooms, found


ROOMS, GRAPH = imports()


def test_the_reader_sees_every_room_and_the_imports_inside_functions():
    assert {"loss", "teacher", "trainer", "data", "models", "rollout", "parallel", "config", "demo",
            "checkpoint_tools", "train", "generate"} <= ROOMS
    assert "megatron_opd/teacher/__init__.py" in " ".join(GRAPH["teacher"]["config"])  # inside make_teacher


@pytest.mark.parametrize("source", sorted(NEVER))
def test_no_room_imports_what_it_must_not(source):
    bad = {target: sites for target, sites in GRAPH.get(source, {}).items() if target in NEVER[source]}
    assert not bad, f"{source} imports {bad}"


def test_only_the_entry_points_import_the_trainer():
    importers = {source for source, targets in GRAPH.items() if "trainer" in targets}
    assert importers <= ENTRY_POINTS, importers - ENTRY_POINTS


def test_data_has_no_torch_distributed():
    assert "torch.distributed" not in GRAPH.get("data", {}), GRAPH["data"]["torch.distributed"]


def test_the_rooms_form_no_cycle():
    edges = {source: {t for t in targets if t in ROOMS} for source, targets in GRAPH.items()}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                sites = [GRAPH[a][b][0] for a, b in zip(cycle, cycle[1:])]
                pytest.fail(f"import cycle {' -> '.join(cycle)} ({', '.join(sites)})")
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
