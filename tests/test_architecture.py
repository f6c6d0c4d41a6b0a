"""The house rules on the import drawing (docs/import_graph.py): no cycles, at most 7
floors (a subpackage is one room), the pipeline's rooms below `run/`, the runner on top."""

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


def test_at_most_seven_library_floors_run_above_primitives_runner_on_top():
    """The library (steer_heal) has at most 7 floors with `run/` alone on its top one; the runner
    sits above it: the command line, then its entry point (which imports the command line
    lazily, so Ctrl-C during the imports ends in one line)."""
    g = drawing()
    floors = g.floors(g.rooms())
    library = {r: f for r, f in floors.items() if r == "steer_heal" or r.startswith("steer_heal.")}
    assert max(library.values()) <= 7, library
    assert [r for r, f in library.items() if f == max(library.values())] == ["steer_heal.run"]
    assert all(floors["runners.cli"] > f for f in library.values())
    top = max(floors.values())
    assert {r for r, f in floors.items() if f == top} <= {"runners.cli", "runners.entry", "runners.__main__"}
    assert floors["runners.entry"] == floors["runners.cli"] + 1


def test_the_pipeline_is_visible_in_the_tree():
    """`ls steer_heal/` shows the stages as rooms and only shared plumbing as loose modules."""
    g = drawing()
    rooms = {r for r in g.rooms() if r.startswith("steer_heal.")}
    stages = {"models", "steering", "filters", "healing", "evaluate", "run", "data"}
    assert {f"steer_heal.{s}" for s in stages} <= rooms
    loose = {r.removeprefix("steer_heal.") for r in rooms} - stages
    assert loose <= {"_version", "errors", "io", "runtime", "sampling", "shards", "vocab"}, loose


def test_the_library_never_imports_the_run_room_or_the_runner():
    g = drawing()
    for importer, targets in g.graph().items():
        if importer.startswith("steer_heal") and g.room(importer) not in ("steer_heal", "steer_heal.run"):
            bad = [t for t in targets if t.startswith("runners") or g.room(t) == "steer_heal.run"]
            assert not bad, (importer, bad)
