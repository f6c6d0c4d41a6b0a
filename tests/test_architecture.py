"""The house rules on the import drawing (docs/import_graph.py): no cycles, at most 7
floors, primitives below the loop, the runner on top."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def drawing():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle_between_modules_or_rooms():
    g = drawing()
    assert g.cycles(g.graph()) == []
    assert g.cycles(g.rooms()) == []


def test_at_most_seven_floors_loop_above_primitives_runner_on_top():
    g = drawing()
    floors = g.floors(g.rooms())
    assert max(floors.values()) <= 7, floors
    top = max(floors.values())
    assert [r for r, f in floors.items() if f == top] == ["runners.cli"]
    library = [r for r in floors if r.startswith("steer_heal.") and r != "steer_heal.loop"]
    assert all(floors[r] < floors["steer_heal.loop"] for r in library), {r: floors[r] for r in library}


def test_the_library_never_imports_the_loop_or_the_runner():
    g = drawing()
    for importer, targets in g.graph().items():
        if importer.startswith("steer_heal") and importer != "steer_heal.loop":
            assert not any(t.startswith("runners") or t == "steer_heal.loop" for t in targets), (importer, targets)
