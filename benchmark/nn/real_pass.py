"""How a method's real-data gradient pass runs (config key `real_pass`): the base methods' real statistic carries no
graph (the references detach it), so it can be computed faster than autograd's eager float32 where results allow.

  eager   the faithful default: eager autograd in float32, as the reference code.
  compile torch.compile of the same function (fused normalisation/activation/pooling kernels; compiled once per
          process and input shape, ~10-40 s, then reused by every fresh network of the same architecture). The same
          float32 math summed in another order: ConvNet-3 gradients agree with eager to ~1e-3 relative, not bit for
          bit. Falls back to eager, with one warning, where compilation fails (no C++ compiler, say).
  bf16    bfloat16 autocast: fast where the hardware has native bf16 (AVX512-BF16/AMX CPUs, recent GPUs), slow
          elsewhere; gradients off by 4-10% relative (ConvNet-3, Fashion-MNIST). A named speed mode, never the
          default.
Counting on the meta device, or under a dispatch mode (run.py plan), always runs eager: the FLOPs are the same.
"""
import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from benchmark.platform.errors import BenchmarkError

REAL_PASSES = ("eager", "compile", "bf16")
_compiled = {}      # fn -> its compiled version
_broken = {}        # "reason" once compilation failed in this process: eager from then on


def check_real_pass(mode):
    if mode not in REAL_PASSES:
        raise BenchmarkError(f"real_pass must be one of {', '.join(REAL_PASSES)} (got {mode!r}); eager is the "
                             f"faithful default")


def run(fn, mode, device_type, *args):
    """fn(*args) (a gradient computation with no graph kept) the `mode` way."""
    if device_type == "meta" or _get_current_dispatch_mode() is not None:
        mode = "eager"  # counting, not computing
    if mode == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return fn(*args)
    if mode == "compile" and "reason" not in _broken:
        if fn not in _compiled:
            _compiled[fn] = torch.compile(fn)
        try:
            return _compiled[fn](*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure; eager below re-raises a genuine error
            _broken["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"real_pass=compile failed ({_broken['reason']}); using eager autograd for the rest of "
                          f"this process")
    return fn(*args)
