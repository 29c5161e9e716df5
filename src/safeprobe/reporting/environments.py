"""Do compared runs share what decides the last bits of their numbers? (environment.json)"""

from __future__ import annotations

import json

# what environment.json fields decide the last bits of a result (docs/reproducibility.md)
COMPARED = {"cpu_kernels": ("cpu_kernels",), "CPU": ("machine", "cpu"), "SIMD capability": ("machine", "cpu_capability"),
            "threads": ("machine", "threads"), "GPU": ("machine", "gpu"), "kernel variables": ("machine", "variables"),
            "commit": ("git", "commit"), "uncommitted changes (sha256 of git diff)": ("git", "diff_sha256"),
            "python": ("python",)}


def _field(env: dict, path: tuple[str, ...]):
    for key in path:
        env = env.get(key) if isinstance(env, dict) else None
    return env


def environment_differences(envs: dict[str, dict]) -> list[str]:
    """One line per field that differs between runs' environment.json files (name -> env), e.g.
    `SIMD capability: AVX512 (run a), AVX2 (run b)`; [] when they agree. Such runs are not
    expected to agree bit for bit (docs/reproducibility.md)."""
    fields = dict(COMPARED)
    if all(env.get("cpu_kernels") == "portable" for env in envs.values()):
        del fields["CPU"]  # the portable path computes the same bits on any x86-64 CPU (kernels.py)
    packages = sorted({p for env in envs.values() for p in (env.get("packages") or {})})
    fields.update({f"package {p}": ("packages", p) for p in packages})
    lines = []
    for label, path in fields.items():
        by_value: dict[str, list[str]] = {}
        for name, env in envs.items():
            by_value.setdefault(json.dumps(_field(env, path), sort_keys=True), []).append(name)
        if len(by_value) > 1:
            lines.append(f"{label}: " + ", ".join(f"{value} ({_names(names)})" for value, names in by_value.items()))
    return lines


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{len(names)} runs"
