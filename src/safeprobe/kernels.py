"""`cpu_kernels`: which floating-point path a run on the CPU takes (docs/reproducibility.md).

PyTorch picks its vectorized kernels by the CPU's SIMD level (AVX-512, AVX2, ...) and MKL its
matrix-multiply code path by CPU model. Each choice changes the last bits of sums, and
fine-tuning amplifies them: two x86-64 CPUs give different numbers for the same command.

- `native`: the fastest path this CPU offers; identical results on this machine only.
- `portable`: one path for every x86-64 CPU: PyTorch's baseline kernels
  (ATEN_CPU_CAPABILITY=default), MKL's SSE2 path (MKL_CBWR=COMPATIBLE), two threads on any
  machine (a fixed count: a parallel sum splits the same way everywhere; MKL reproduces across
  CPUs only for equal thread counts).
- `auto` (default): portable for the synthetic world, native for pretrained models.

Both libraries read their setting at their first kernel, so the path is set at the start of
the run; a process that has already computed natively (an earlier job of the same sweep)
stays native — with cpu_kernels=portable that is an error, with auto a logged fallback. GPU
runs are not affected.
"""

from __future__ import annotations

import logging
import os

import torch

from safeprobe.config import RunError

log = logging.getLogger(__name__)
PORTABLE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
THREADS = 2  # fixed, whatever the machine has: the same split of every parallel sum everywhere
_pinned: list[str] = []  # ["portable"] once this process is on that path


def pin(mode: str, model_kind: str, accelerator: str) -> str:
    """Put this process on the path `mode` asks for; return the path it is on."""
    wanted = mode == "portable" or (mode == "auto" and model_kind == "synthetic")
    on_cpu = accelerator in ("cpu", "auto") and not torch.cuda.is_available()
    if _pinned or not (wanted and on_cpu):
        if _pinned and mode == "native":
            raise RunError("cpu_kernels=native needs a fresh process: this one runs the portable path (a sweep "
                           "that mixes cpu_kernels values: run one sweep per value)")
        return "portable" if _pinned else "native"
    before = {k: os.environ.get(k) for k in PORTABLE}
    os.environ.update(PORTABLE)
    capability = torch.backends.cpu.get_cpu_capability()  # fixed at its first call, from the variable
    if capability != "DEFAULT":
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})
        if mode == "portable":
            raise RunError(f"cpu_kernels=portable needs a fresh process: this one already runs PyTorch's {capability} "
                           "kernels (a sweep that mixes cpu_kernels values: run one sweep per value)")
        log.info("cpu_kernels=auto: this process already runs %s kernels; it stays on the native path", capability)
        return "native"
    torch.set_num_threads(THREADS)
    _pinned.append("portable")
    return "portable"


def cache_tag() -> dict:
    """Added to cache keys: a model built on the portable path (with its thread count) is another model."""
    return {"cpu_kernels": _pinned[0], "threads": THREADS} if _pinned else {}
