"""Content-addressed cache of stage outputs (the synthetic aligned model, alignment stages).

An entry is a folder `<cache_dir>/<kind>/<key>`, key = a hash of everything that produced it.
It is built in a temporary folder beside it, its marker file is written last, and the folder
is renamed into place in one atomic step; a file lock makes parallel sweep jobs that ask for
the same entry build it once (the others wait and read it). A folder without its marker is
an interrupted build and is never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def key_of(spec: dict) -> str:
    """A short stable hash of a JSON-able description of how an entry is made."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached(root: str | Path, kind: str, spec: dict, build: Callable[[Path], dict], marker: str = "stage.json") -> Path:
    """The entry for `spec`, built by `build(folder)` on first use. `build` fills the folder and
    returns a summary, written with the spec into the marker file once everything else is there."""
    target = Path(root) / kind / key_of(spec)
    if (target / marker).exists():
        return target
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / marker).exists():  # another job built it while this one waited
            return target
        if target.exists():  # an interrupted build (no marker): start again
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".building-{target.name}-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            summary = build(tmp)
            (tmp / marker).write_text(json.dumps({"key": target.name, "spec": spec, **summary}, indent=2, default=str))
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
