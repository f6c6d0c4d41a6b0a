"""Running the method: the loop over the primitives, its settings, its run directory and what
is made from a finished run (figures, reports, exports, dose sweeps).

- `loop`: one distill-and-heal round and the loop, as plain functions;
- `config`: `RunConfig`, presets, layered resolution and validation;
- `runlog`: `RunDir`, events.jsonl, atomic checkpoints, resume; `lock`: `FolderLock`;
- `plot`: figures and the report from events.jsonl; `export`: merged, baked and adapter exports;
- `sweep`: a dose sweep (profile, coherence, filter per coefficient).
"""

from .config import PRESETS, RunConfig
from .export import export_adapters, export_baked, export_merged
from .lock import FolderLock
from .loop import one_round, run
from .plot import render
from .runlog import RunDir, read_events
from .sweep import dose_sweep, sweep_report

__all__ = [
    "PRESETS",
    "FolderLock",
    "RunConfig",
    "RunDir",
    "dose_sweep",
    "export_adapters",
    "export_baked",
    "export_merged",
    "one_round",
    "read_events",
    "render",
    "run",
    "sweep_report",
]
