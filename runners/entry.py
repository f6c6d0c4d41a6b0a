"""The `steer-heal` console script: the command line, ending in one line at any moment.

- Ctrl-C, also while the first imports load (torch takes seconds): `Aborted`, exit 130.
- SIGTERM is raised as `Terminated` where the process is, so every `finally` and `with` runs
  (steering hooks removed, adapter toggles undone, export staging folders deleted, the run's
  lock released; the run resumes from its last checkpoint): `Terminated`, exit 143.
- A closed pipe (`steer-heal steer ... | head -2`): quiet, exit 141, as a killed writer would.
"""

from __future__ import annotations

import os
import signal
import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as an exception so cleanup runs (see the module docstring)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _terminated() -> str:
    """`Terminated`, and under a launcher the rank whose death made it stop the others."""
    parallel = sys.modules.get("steer_heal.run.parallel")
    lost = parallel.lost_ranks() if parallel is not None else None
    return f"Terminated: {lost}" if lost else "Terminated"


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        import click

        from runners.cli import PipeClosed
        from runners.cli import main as cli

        try:
            return cli.main(args=argv, prog_name="steer-heal", standalone_mode=False) or 0
        except PipeClosed:
            raise BrokenPipeError from None
    except Terminated:
        print(_terminated(), file=sys.stderr)
        return 143
    except (KeyboardInterrupt, EOFError):
        print("Aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except Exception as exc:  # click's own: usage errors, Abort (Ctrl-C at a prompt)
        if "click" in sys.modules:
            import click

            if isinstance(exc, click.exceptions.Abort):  # click turns a KeyboardInterrupt into Abort
                if isinstance(exc.__cause__, Terminated) or isinstance(exc.__context__, Terminated):
                    print(_terminated(), file=sys.stderr)
                    return 143
                print("Aborted", file=sys.stderr)
                return 130
            if isinstance(exc, click.ClickException):
                exc.show()
                return exc.exit_code
        raise


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
