"""Cheap invariants of how the project is installed: the lock files against pyproject.toml, the
Docker images against the lock files and .dockerignore, the README's commands. Text only (no
pip, no docker), well under a second."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu"]


def pins(path: str) -> dict[str, str]:
    """name -> version of a lock file; every line but comments must be exactly name==version."""
    out = {}
    for line in (ROOT / path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~,]+)", line.strip())
        assert m, f"{path}: {line!r} is not name==version"
        name = canonicalize_name(m[1])
        assert name not in out, f"{path}: {m[1]} pinned twice"
        out[name] = m[2]
    return out


LOCK, LOCK_CUDA = pins("requirements/lock.txt"), pins("requirements/lock-cuda.txt")


def requirements() -> list[tuple[str, Requirement]]:
    groups = {"dependencies": PROJECT["dependencies"], **PROJECT.get("optional-dependencies", {})}
    return [(group, Requirement(line)) for group, lines in groups.items() for line in lines]


@pytest.mark.parametrize("group,req", requirements(), ids=lambda x: str(x))
def test_the_lock_pins_every_dependency_within_pyprojects_bounds(group, req):
    name = canonicalize_name(req.name)
    assert name in LOCK, f"requirements/lock.txt does not pin {req} ({group}): run requirements/update"
    assert req.specifier.contains(Version(LOCK[name]), prereleases=True), \
        f"requirements/lock.txt pins {name}=={LOCK[name]}, outside pyproject's {req} ({group}): run requirements/update"


def test_every_dependency_has_a_lower_bound_for_ci_min_versions():
    for group, req in requirements():
        floors = [s for s in req.specifier if s.operator in (">=", "==", "~=")]
        assert len(floors) == 1, f"{req} ({group}) needs one lower bound: .ci/min_versions installs it"


def test_the_lock_files_fit_together():
    assert not set(LOCK) & set(LOCK_CUDA), "a package pinned in both lock files"
    # a local label (+cpu) would refuse the CUDA build, and the images pin torch as the lock does
    assert "+" not in LOCK["torch"]
    for path in DOCKERFILES:
        assert any(f"pip install torch=={LOCK['torch']} " in run for run in instructions(path, "RUN")), path
    assert "torch" not in LOCK_CUDA and "triton" in LOCK_CUDA


def instructions(path: str, keyword: str | None = None) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped; those of one
    keyword without it."""
    lines = [line for line in (ROOT / path).read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = [line.strip() for line in text.splitlines() if line.strip()]
    if keyword is None:
        return out
    return [line[len(keyword):].strip() for line in out if line.split()[0].upper() == keyword]


@pytest.mark.parametrize("path", DOCKERFILES)
def test_each_image_installs_from_the_lock_as_a_non_root_user_and_records_its_commit(path):
    ops = instructions(path)
    keys = [op.split()[0].upper() for op in ops]
    installs = [i for i, op in enumerate(ops) if keys[i] == "RUN" and "pip install" in op]
    assert installs and all("-c requirements/lock.txt" in ops[i] for i in installs), "every pip install uses the lock"
    copy_lock = next(i for i, op in enumerate(ops) if keys[i] == "COPY" and op.split()[1] == "requirements")
    assert copy_lock < installs[0]
    users = [op.split()[1] for op, k in zip(ops, keys) if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the container runs as root"
    arg = next(i for i, op in enumerate(ops) if keys[i] == "ARG" and op.split()[1].split("=")[0] == "GIT_COMMIT")
    assert arg > installs[-1], "ARG GIT_COMMIT before a pip install: every new commit reinstalls the packages"
    assert any(re.search(r"\bSAFEPROBE_GIT_COMMIT=\$\{?GIT_COMMIT\}?", e) for e in instructions(path, "ENV"))
    env = " ".join(instructions(path, "ENV"))
    home, cache = re.search(r"\bHF_HOME=(\S+)", env)[1], re.search(r"\bSAFEPROBE_CACHE=(\S+)", env)[1]
    volumes = " ".join(instructions(path, "VOLUME"))
    workdir = instructions(path, "WORKDIR")[-1]
    for folder in (home, cache, f"{workdir}/outputs", f"{workdir}/multirun"):
        assert f'"{folder}"' in volumes, f"{folder} is not a VOLUME"


def test_the_code_reads_the_commit_the_images_set():
    assert "SAFEPROBE_GIT_COMMIT" in (ROOT / "src/safeprobe/tracking.py").read_text()


def docker_match(pattern: str, path: str) -> bool:
    """Docker's .dockerignore matching (Go's filepath.Match plus **), anchored at the context root."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        else:
            regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.fullmatch(regex, path) is not None


def ignored(path: str, patterns: list[str]) -> bool:
    """The last pattern that matches the path or a folder above it decides."""
    parts = path.split("/")
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(docker_match(pattern, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            result = not negate
    return result


def test_dockerignore_keeps_what_the_images_copy_and_drops_the_bulk():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = {src for path in DOCKERFILES for op in instructions(path, "COPY") for src in op.split()[:-1]
               if not src.startswith("--")}
    assert {"requirements", "src", "conf", "pyproject.toml"} <= sources
    for src in sorted(sources):
        assert (ROOT / src).exists(), f"the images copy {src}, which is not in the repository"
        assert not ignored(src, patterns), f".dockerignore drops {src}, which the images copy"
        if (ROOT / src).is_dir():
            kept = [f for f in (ROOT / src).rglob("*") if f.is_file() and "__pycache__" not in f.parts
                    and not any(p.endswith(".egg-info") for p in f.parts)]
            dropped = [f for f in kept if ignored(str(f.relative_to(ROOT)), patterns)]
            assert not dropped, f".dockerignore drops {dropped[:3]}"
    for bulk in (".venv", ".cache", "outputs", "multirun", ".git"):
        assert ignored(bulk, patterns), f"{bulk} goes into every build context"


def test_the_readme_installs_from_the_lock_and_builds_with_the_commit():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set up"):readme.index("\n## ", readme.index("## Set up") + 1)]
    commands = [line for line in setup.splitlines() if "pip install" in line and line.startswith("    ")]
    assert len(commands) == 2 and all("-c requirements/lock.txt" in c for c in commands)
    docker = readme[readme.index("## Docker"):]
    assert "--build-arg GIT_COMMIT=$(git rev-parse HEAD)" in docker
    for flag in ("--gpus all", "--ipc=host", "-e HF_TOKEN", "-e WANDB_API_KEY", "--user", ":/data/hf",
                 ":/data/safeprobe-cache", ":/workspace/safeprobe/outputs", ":/workspace/safeprobe/multirun"):
        assert flag in docker, flag
