"""What moves the synthetic world's numbers between machines: CPU kernel paths and threads.

    python benchmarks/kernel_paths.py                                  # every setting, seed 0, SAP
    python benchmarks/kernel_paths.py --settings native,avx2 --methods sft,sap --seeds 0,1,2,3,4
    python benchmarks/kernel_paths.py --settings native,portable model=synthetic_micro

Each setting runs `train.py` in fresh processes with its environment (ATEN_CPU_CAPABILITY picks
PyTorch's SIMD kernels, MKL_CBWR MKL's code path, OMP_NUM_THREADS the threads) and its own
cache folder, so the aligned model is built under that setting too. One machine can imitate
another's SIMD level by lowering ATEN_CPU_CAPABILITY (not raising it). Prints, per setting,
the starting model's checksum and its before-fine-tuning numbers, each job's after numbers, and
the time of the first job (which builds the aligned model) and of the others; a markdown table
for docs/reproducibility.md. Numbers identical to the first setting's are marked `=`. With
--keep, jobs whose folder already holds results.json are read, not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ["cpu_kernels=native"]
SETTINGS = {  # name -> (environment, train.py overrides)
    "native": ({}, NATIVE),
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, NATIVE),
    "default": ({"ATEN_CPU_CAPABILITY": "default"}, NATIVE),
    "mkl-compatible": ({"MKL_CBWR": "COMPATIBLE"}, NATIVE),
    "1-thread": ({"OMP_NUM_THREADS": "1"}, NATIVE),
    "portable": ({}, ["cpu_kernels=portable"]),
    # what the portable path must be immune to: another machine's SIMD level and MKL path
    "portable-avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}, ["cpu_kernels=portable"]),
}
QUIET = ["logger=csv", "trainer.enable_progress_bar=false", "save_adapter=false"]


def job(setting: tuple[dict, list[str]], cache: Path, out: Path, args: list[str]) -> tuple[dict, float]:
    env = {**os.environ, **setting[0], "SAFEPROBE_CACHE": str(cache), "WANDB_MODE": "offline"}
    args = [*args, *setting[1]]
    if (out / "results.json").is_file():  # --keep: a job an earlier call finished (its time is not known)
        return {**json.loads((out / "results.json").read_text()),
                "environment": json.loads((out / "environment.json").read_text())}, float("nan")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *QUIET, *args, f"hydra.run.dir={out}"], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
        sys.exit(f"train.py failed under {setting}: {lines[-1] if lines else proc.returncode}")
    results = json.loads((out / "results.json").read_text())
    results["environment"] = json.loads((out / "environment.json").read_text())
    return results, seconds


def fmt(value: float | None, reference: float | None) -> str:
    if value is None:
        return "-"
    return "=" if reference is not None and value == reference else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--methods", default="sap")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--keep", type=Path, help="keep run folders and caches here (default: a temporary folder)")
    args, overrides = parser.parse_known_args()
    names = args.settings.split(",")
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    root = args.keep or Path(tempfile.mkdtemp(prefix="kernel_paths_"))
    rows, reference = [], {}
    print("| setting | capability | threads | start sha256 | before margin | before test loss | job | after HS | "
          "after margin | after test loss | first job s | other jobs s (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        times, results = [], []
        for method in methods:
            for seed in seeds:
                r, s = job(SETTINGS[name], root / name / "cache", root / name / f"{method}_{seed}",
                           [*overrides, f"method={method}", f"seed={seed}"])
                results.append((f"{method} {seed}", r))
                times.append(s)
        env = results[0][1]["environment"]
        machine = env["machine"]
        before = results[0][1]["before"]
        others = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else None
        for i, (label, r) in enumerate(results):
            ref = reference.get(label)
            after = r["after"]
            cells = [fmt(after["harmful_score"], ref and ref["harmful_score"]),
                     fmt(after["refusal_margin"], ref and ref["refusal_margin"]),
                     fmt(after["test_loss"], ref and ref["test_loss"])]
            head = [name, machine["cpu_capability"], str(machine["threads"]), env["start_weights_sha256"][:12],
                    fmt(before["refusal_margin"], reference.get("before") and reference["before"]["refusal_margin"]),
                    fmt(before["test_loss"], reference.get("before") and reference["before"]["test_loss"])]
            if i:
                head = [""] * len(head)
            tail = [f"{times[0]:.1f}", f"{others:.1f}" if others else "-"] if i == 0 else ["", ""]
            print("| " + " | ".join(head + [label] + cells + tail) + " |", flush=True)
            rows.append({"setting": name, "job": label, "after": after, "before": before,
                         "start_weights_sha256": env["start_weights_sha256"], "machine": machine})
        if not reference:
            reference = {"before": before, **{label: r["after"] for label, r in results}}
    (root / "kernel_paths.json").write_text(json.dumps(rows, indent=2))
    print(f"\nfolders and kernel_paths.json: {root}")


if __name__ == "__main__":
    main()
