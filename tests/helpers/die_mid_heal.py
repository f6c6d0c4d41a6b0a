"""`steer-heal` under a launcher, where one rank kills itself (SIGKILL) mid-heal.

    torchrun --nproc-per-node 2 tests/helpers/die_mid_heal.py RANK ROUND STEP -- run ...

Rank RANK sends itself SIGKILL when the heal of round ROUND reaches optimiser step STEP, as
`kill -9` from outside would, but at a moment fixed by the run rather than by a clock.
"""

import os
import signal
import sys

from steer_heal.healing import train


def main() -> int:
    rank, round_, step = (int(x) for x in sys.argv[1:4])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    step_fn = train._step

    def dying_step(hist, slot, group, regs, frozen, anchors, train_, r, *rest):
        if int(os.environ["RANK"]) == rank and r == round_ and rest[2] == step:  # rest: pad, device, step, ...
            os.kill(os.getpid(), signal.SIGKILL)
        return step_fn(hist, slot, group, regs, frozen, anchors, train_, r, *rest)

    train._step = dying_step
    from runners.entry import main as entry

    return entry(argv)


if __name__ == "__main__":
    sys.exit(main())
