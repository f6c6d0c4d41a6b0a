"""The library's error types: one root, so a caller (or the command line) can catch them all.

    SteerHealError
    ├── InputError (also a ValueError)      bad arguments, settings or files given by the user
    │   ├── ConfigError                     a run config (TOML, preset, flags) that cannot run
    │   ├── FileFormatError                 a vector, adapter, axis or event file that cannot be read
    │   ├── ModelMismatch                   a vector or adapter made for another model
    │   ├── MissingFile (also FileNotFoundError) a file the call needs is not there
    │   ├── NotFound (also KeyError)        a key a record does not hold
    │   └── RunDirError                     a run directory that is locked, foreign or damaged
    ├── ModelLoadError                      a model that cannot be found or loaded
    │   └── MissingPackage (also ModuleNotFoundError) an optional package is not installed
    ├── StateError (also a RuntimeError)    an object used out of order (a slot outside its `with`)
    ├── DoseError (also a RuntimeError)     no usable steering dose, too little kept text
    ├── OutOfMemory (also a MemoryError)    a batch that did not fit; names the setting to lower
    ├── RankFailed (also a RuntimeError)    another process of a launch (torchrun) failed or died
    └── HealDiverged (also a RuntimeError)  training blew up; nothing was folded

Every message is one line that says what to do next. `InputError` subclasses `ValueError`
so code that caught the library's `ValueError`s keeps working.
"""

from __future__ import annotations


class SteerHealError(Exception):
    """Root of every error this library raises on purpose."""


class InputError(SteerHealError, ValueError):
    """Bad input: arguments, settings or files given by the user."""


class ConfigError(InputError):
    """A run config that cannot run; raised before anything is loaded or written."""


class FileFormatError(InputError):
    """A file that is not what it claims to be (corrupt, truncated, tampered, wrong kind)."""


class ModelMismatch(InputError):
    """A vector or adapter used with a model other than the one it was made for."""


class MissingFile(InputError, FileNotFoundError):
    """A file or folder the call needs is not there (also a FileNotFoundError)."""


class ModelLoadError(SteerHealError):
    """A model or tokenizer that cannot be found or loaded."""


class MissingPackage(ModelLoadError, ModuleNotFoundError):
    """An optional package a call needs (the embedded model, the sentence embedder) is not installed."""


class NotFound(InputError, KeyError):
    """A key asked of a record that does not hold it (also a KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RunDirError(InputError):
    """A run directory that is in use, not ours, or damaged."""


class StateError(SteerHealError, RuntimeError):
    """An object used out of order, e.g. a `SteeringSlot` outside its `with` block."""


class DoseError(SteerHealError, RuntimeError):
    """No usable dose, or too few completions survived the filter."""


class OutOfMemory(SteerHealError, MemoryError):
    """A batch that did not fit the device's memory; the message names the setting to lower."""


class RankFailed(SteerHealError, RuntimeError):
    """Another process of the same launch (torchrun, accelerate) raised or died mid-stage;
    the message names its rank. The run resumes from its last checkpoint."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's `torch.OutOfMemoryError`, a `MemoryError`, or the CPU allocator's RuntimeError."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
