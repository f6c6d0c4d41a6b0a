"""Float tolerances that follow from the computation, not from what one machine produced.

Two float computations of one quantity that differ only in the order of their sums
(batching, padding, a KV cache against whole sequences, thread count, SIMD width, another
CPU's matmul kernels) agree to a few units in the last place (ulps) of the *largest
magnitude the computation passed through*, not of the result: the difference of two
activations of size 6 can be 1e-3 and still carry their 1e-6 of rounding. So a tolerance
here is `ULPS * eps(dtype) * scale`, with `scale` that largest magnitude.

ULPS = 64: every comparison still passed at 4 ulps (and 2-4 failed at 2 ulps) on an
AMD EPYC in three configurations: 2 threads with the AVX-512 kernels, 1 thread with ATen's
portable kernels and MKL's compatible code path, 1 thread with the AVX2 kernels
(docs/benchmarks.md, "Float tolerances"). 64 leaves 16x headroom and is still below 1e-5 of
the scale, far under any real bug (a wrong position, layer or sign moves results by whole
units of the scale). Bitwise assertions stay where the code path is the same by
construction (hook against hook, a restore after an exception).
"""

from __future__ import annotations

import os

import pytest
import torch

# STEER_HEAL_TEST_ULPS lowers it to measure the headroom (docs/benchmarks.md); tests never set it
ULPS = float(os.environ.get("STEER_HEAL_TEST_ULPS", 64))


def eps(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps


def magnitude(*values) -> float:
    """The largest absolute value among tensors, arrays and numbers (for a `scale`)."""
    out = 0.0
    for v in values:
        t = torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, torch.Tensor) else v.detach()
        if t.numel():
            out = max(out, float(t.abs().max()))
    return out


def rounding_atol(scale: float, dtype: torch.dtype = torch.float32, ulps: float = ULPS) -> float:
    """The absolute tolerance for reordered float sums whose largest magnitude is `scale`."""
    return ulps * eps(dtype) * scale


@torch.no_grad()
def forward_scale(model, input_ids: torch.Tensor, **kwargs) -> float:
    """The largest magnitude a forward passes through: every block's output and the logits."""
    out = model(input_ids=input_ids, output_hidden_states=True, **kwargs)
    return magnitude(out.logits, *out.hidden_states)


def assert_close_rounding(got, want, scale: float | None = None, *, dtype=torch.float32, ulps=ULPS, msg=None):
    """`got == want` up to reordered float sums in `dtype`; `scale` defaults to the operands' own
    largest magnitude (right when the result is as large as anything it was computed from)."""
    got_t = torch.as_tensor(got, dtype=torch.float64)
    want_t = torch.as_tensor(want, dtype=torch.float64)
    scale = magnitude(got_t, want_t) if scale is None else scale
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=rounding_atol(scale, dtype, ulps), msg=msg)


def approx_rounding(want, scale: float, *, dtype=torch.float32, ulps=ULPS, relative: bool = False):
    """pytest.approx with the rounding tolerance: absolute, or relative when `relative` (for a
    quantity such as a perplexity, exp of a mean whose absolute error is bounded by the scale)."""
    tol = rounding_atol(scale, dtype, ulps)
    return pytest.approx(want, rel=tol, abs=0) if relative else pytest.approx(want, abs=tol, rel=0)
