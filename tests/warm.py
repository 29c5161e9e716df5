"""A warm interpreter for the tests' `python train.py ...` / `python eval.py ...` commands.

Most of such a command's few seconds go to importing torch, Lightning and transformers. The tests
run about a hundred of them, so each pytest worker starts this file once as a server: it imports those
modules, then forks one child per command, which runs the script as `__main__` with the command's
argv, folder and environment and its own stdout/stderr files, and exits with the script's status
as the interpreter would (threads joined, atexit handlers run; modules are not torn down). The code under test is the same as in a
fresh process; only the imports are shared. A command whose environment differs from the server's
(import-time settings such as HF_HOME would be stale; pytest's PYTEST_* variables aside) runs in
another server, or, past two, in a fresh process.

Protocol (one JSON object per line): the client writes {"id", "script", "args", "cwd", "env",
"out", "err"}; the server answers {"id", "pid"} when the child starts and {"id", "status"} when it
ends (status as subprocess's returncode: the exit code, or -N when killed by signal N).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "eval.py")  # the commands whose imports are the heavy ones


# ------------------------------------------------------------------------- the server


def _child(req: dict) -> None:
    """In the forked child: become `python <script> <args>` and exit as it would."""
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        target = os.open(path, flags)
        os.dup2(target, fd)
        os.close(target)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    script = req["script"]  # its path
    sys.argv = [script, *req["args"]]
    sys.path[0] = str(PROJECT_ROOT)
    import atexit
    import runpy
    import traceback

    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else (print(e.code, file=sys.stderr), 1)[1]
    except BaseException:  # noqa: BLE001  as the interpreter reports an uncaught exception
        traceback.print_exc()
        status = 1
    # the interpreter's exit, without tearing down every module (a second with torch loaded)
    threading._shutdown()  # joins non-daemon threads
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def serve() -> None:
    sys.path[0] = str(PROJECT_ROOT)  # as for `python train.py`, not this file's folder
    import safeprobe.evaluation.evaluate  # noqa: F401
    import safeprobe.pipeline  # noqa: F401  what train.py and eval.py import: torch, Lightning, transformers, PEFT

    pending: dict[int, int] = {}  # child pid -> request id
    buffered = b""
    out = sys.stdout

    def answer(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    while True:
        ready, _, _ = select.select([0], [], [], 0.05)
        if ready:
            chunk = os.read(0, 65536)
            if not chunk:  # the client is gone: let the children finish on their own
                return
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                req = json.loads(line)
                out.flush()
                pid = os.fork()
                if pid == 0:
                    _child(req)  # never returns
                pending[pid] = req["id"]
                answer({"id": req["id"], "pid": pid})
        while pending:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            answer({"id": pending.pop(pid), "status": os.waitstatus_to_exitcode(status)})


# ------------------------------------------------------------------------- the client


class Running:
    """A command started in the warm server: its pid, and its end."""

    def __init__(self, pid: int, done: Future, command: list[str], out: Path, err: Path):
        self.pid, self._done, self.args, self._out, self._err = pid, done, command, out, err

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def poll(self) -> int | None:
        return self._done.result() if self._done.done() else None

    def finish(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            status = self._done.result(timeout=timeout)
        except FutureTimeout:
            self.send_signal(signal.SIGKILL)
            self._done.result(timeout=60)
            raise subprocess.TimeoutExpired(self.args, timeout) from None
        out, err = (p.read_text(errors="replace") for p in (self._out, self._err))
        for p in (self._out, self._err):
            p.unlink(missing_ok=True)
        return subprocess.CompletedProcess(self.args, status, out, err)


class Server:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=PROJECT_ROOT, env=dict(os.environ))
        self.lock = threading.Lock()
        self.started: dict[int, Future] = {}
        self.ended: dict[int, Future] = {}
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.lock:
                waiting = self.started.pop(msg["id"]) if "pid" in msg else self.ended.pop(msg["id"])
            waiting.set_result(msg.get("pid", msg.get("status")))

    def start(self, command: list[str], cwd: Path, out: Path, err: Path) -> Running:
        """command: [python, the script's path, *args], as a fresh process would run."""
        with self.lock:
            rid, self.next_id = self.next_id, self.next_id + 1
            started, ended = self.started[rid], self.ended[rid] = Future(), Future()
            req = {"id": rid, "script": command[1], "args": command[2:], "cwd": str(cwd), "env": dict(os.environ),
                   "out": str(out), "err": str(err)}
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        pid = started.result(timeout=120)
        return Running(pid, ended, command, out, err)


_servers: dict[frozenset, Server] = {}  # one per environment the commands ran in (at most MAX_SERVERS)
MAX_SERVERS = 2
_lock = threading.Lock()
_outputs: Path | None = None  # where the children's stdout/stderr files go
_count = 0


def start(script: str, *args: str, cwd: Path) -> Running | subprocess.Popen:
    """`python <script> <args>` in `cwd`: in a warm server where it can run there, else a fresh process
    (both answer send_signal, poll and finish(timeout) -> CompletedProcess)."""
    global _outputs, _count
    command = [sys.executable, str(PROJECT_ROOT / script), *args]
    env = frozenset((k, v) for k, v in os.environ.items() if not k.startswith("PYTEST_"))  # pytest's own: per test
    with _lock:
        if script in SCRIPTS and env not in _servers and len(_servers) < MAX_SERVERS and _server_usable():
            _servers[env] = Server()
        server = _servers.get(env) if script in SCRIPTS else None
        if _outputs is None:
            _outputs = Path(tempfile.mkdtemp(prefix="safeprobe-warm-"))
        _count += 1
        name = _outputs / str(_count)
    if server is None:
        return Cold(command, cwd)
    return server.start(command, Path(cwd), name.with_suffix(".out"), name.with_suffix(".err"))


def _server_usable() -> bool:
    return hasattr(os, "fork") and os.environ.get("SAFEPROBE_TESTS_COLD") != "1"


class Cold(subprocess.Popen):
    """A fresh `python <script>` process, with the warm commands' finish()."""

    def __init__(self, command: list[str], cwd: Path):
        super().__init__(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=os.environ.copy())

    def finish(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            out, err = self.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.communicate()
            raise
        return subprocess.CompletedProcess(self.args, self.returncode, out, err)


if __name__ == "__main__":
    serve()
