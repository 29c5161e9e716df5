"""`cpu_kernels`: which floating-point path a run on the CPU takes (docs/reproducibility.md).

PyTorch picks its vectorized kernels by the CPU's SIMD level (AVX-512, AVX2, ...), MKL picks
its matrix-multiply code path by CPU model, and reductions split work by thread count. Each
choice changes the last bits of every sum, and fine-tuning amplifies them: two x86-64 CPUs
give different numbers for the same command and seed.

- `native`: the fastest path this CPU offers; results are identical on this machine only.
- `portable`: the same path on every x86-64 CPU: PyTorch's baseline kernels
  (ATEN_CPU_CAPABILITY=default), MKL's SSE2 path (MKL_CBWR=COMPATIBLE), one thread. Set by the
  run itself before its first kernel, so it needs a fresh process (train.py, eval.py).
"""

from __future__ import annotations

import os

import torch

from safeprobe.config import RunError

PORTABLE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
_pinned: list[str] = []  # "portable" once this process is on that path


def pin(mode: str, accelerator: str) -> None:
    """Put the run on `mode`'s path; a no-op for native runs and for runs on a GPU."""
    if mode != "portable" or accelerator not in ("cpu", "auto") or torch.cuda.is_available():
        if _pinned and mode == "native":
            raise RunError("cpu_kernels=native needs a fresh process: this one runs the portable path (a sweep "
                           "that mixes cpu_kernels values: run one sweep per value)")
        return
    os.environ.update(PORTABLE)  # read by PyTorch and MKL at their first kernel, not before
    torch.set_num_threads(1)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT":
        raise RunError(f"cpu_kernels=portable needs a fresh process: this one already runs PyTorch's {capability} "
                       "kernels (a sweep that mixes cpu_kernels values: run one sweep per value)")
    _pinned[:] = ["portable"]


def cache_tag() -> dict:
    """Added to cache keys: a model built on the portable path is another model."""
    return {"cpu_kernels": _pinned[0]} if _pinned else {}
