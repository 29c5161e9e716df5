"""Content-addressed cache of stage outputs (the synthetic aligned model, alignment stages).

An entry is a folder `<cache_dir>/<kind>/<key>`, key = a hash of everything that produced it.
It is built in a temporary folder beside it, its marker file is written last, and the folder
is renamed into place in one atomic step; a file lock makes parallel sweep jobs that ask for
the same entry build it once (the others wait and read it). The marker records a checksum of
every file: an entry without its marker (an interrupted build) or whose files no longer match
(a truncated or edited file) is never read, but rebuilt; so are temporary folders left by a
killed build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from safeprobe.config import ConfigError

log = logging.getLogger(__name__)


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


HASHED_UP_TO = 64 * 2**20  # larger files (a merged 7B model) are checked by size: hashing them at every load costs minutes


def checksums(folder: Path, marker: str) -> dict[str, str]:
    """sha256 (or, above HASHED_UP_TO bytes, the size) of every file of an entry but its marker."""
    def fingerprint(f: Path) -> str:
        size = f.stat().st_size
        return f"{size} bytes" if size > HASHED_UP_TO else hashlib.sha256(f.read_bytes()).hexdigest()

    return {str(f.relative_to(folder)): fingerprint(f) for f in sorted(folder.rglob("*")) if f.is_file() and f.name != marker}


def intact(target: Path, marker: str) -> bool:
    """The entry is complete (its marker exists, written last) and its files are as built."""
    try:
        recorded = json.loads((target / marker).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return checksums(target, marker) == recorded


def cached(root: str | Path, kind: str, spec: dict, build: Callable[[Path], dict], marker: str = "stage.json") -> Path:
    """The entry for `spec`, built by `build(folder)` on first use. `build` fills the folder and
    returns a summary, written with the spec and the files' checksums into the marker file once
    everything else is there. An entry whose marker is missing or whose files changed since
    (an interrupted build, a truncated file) is rebuilt. Entries built on the portable CPU
    path are kept apart from native ones (kernels.py)."""
    from safeprobe import kernels

    spec = {**spec, **kernels.cache_tag()}
    target = Path(root) / kind / key_of(spec)
    if intact(target, marker):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, a read-only disk
        raise ConfigError(f"paths.cache_dir={str(root)!r} is invalid ({e.strerror}: {e.filename}); allowed: a folder "
                          "this user can write (paths.cache_dir or SAFEPROBE_CACHE)") from None
    with _locked(target.parent / f".{target.name}.lock"):
        if intact(target, marker):  # another job built it while this one waited
            return target
        for stale in [target, *target.parent.glob(f".building-{target.name}-*")]:  # no one else holds the lock
            if stale.exists():
                log.warning("rebuilding the damaged or unfinished cache entry %s", stale)
                shutil.rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".building-{target.name}-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            summary = build(tmp)
            record = {"key": target.name, "spec": spec, **summary, "files": checksums(tmp, marker)}
            (tmp / marker).write_text(json.dumps(record, indent=2, default=str))
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
