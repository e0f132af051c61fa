"""A run's life around its training loop, the same for both recipes: who owns the output folder, and how a signal
stops the run.

- `claim_output_dir`: before any heavy work, rank 0 creates `output_dir` and a lock file in it (`vppo.lock`: host,
  pid, start time, command). Creating that file is also the write probe: a folder nobody can write to (read-only
  mount, no permission, also under root) is refused here with the fix named, not by an errno traceback at the first
  checkpoint. A lock left by a process that is gone (same host, pid not running) is taken over with a warning; a live
  one, or one from another host (whose pid cannot be checked from here), is refused naming its owner.
- `StopRequest`: SIGTERM / SIGINT only set a flag; the training loop asks `agreed()` once per step (an all-reduce,
  so every rank stops at the same step), saves the completed step and exits with 128 + the signal number. torchrun's
  agent passes the signal it receives (SIGTERM, SIGINT, SIGHUP or SIGQUIT) on to every worker unchanged, so only
  SIGTERM and SIGINT reach a handler here (`vppo-recipes run` passes a SIGHUP on as SIGTERM); it then waits
  `--shutdown_timeout` seconds (30 by default) before SIGKILL, so a step must finish within that time to be saved; otherwise the run resumes from its
  last checkpoint, which is still exact, only later.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# torch and the checkpoint code are imported where used: the demo checks its folders with this module before any
# heavy import, to answer a bad setting at once.

__all__ = [
    "LOCK_FILE",
    "OutputDirError",
    "OutputDirLock",
    "StopRequest",
    "check_writable",
    "claim_output_dir",
    "lock_output_dir",
    "stopped_message",
]

LOCK_FILE = "vppo.lock"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class OutputDirError(RuntimeError):
    """`output_dir` cannot be used: not writable, or owned by another run (the message names the fix)."""


def _process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), None where unknown.

    Recorded in the lock, so that a later process that happens to get the owner's pid is not taken for the owner.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)" start at field 3


def _pid_alive(pid: int, start: int | None) -> bool:
    """Whether process `pid` (started at `start`, when recorded) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


class OutputDirLock:
    """The lock file this process holds on an output folder; `release` (or leaving the `with` block) removes it.

    path: the lock file, or None on ranks other than 0 (which hold nothing; releasing is then a no-op).
    """

    def __init__(self, path: Path | None, token: dict[str, Any] | None = None) -> None:
        self.path, self._token = path, token
        if path is not None:
            atexit.register(self.release)  # an exception that ends the interpreter still frees the folder

    def release(self) -> None:
        """Remove the lock file if it is still this process's (idempotent)."""
        if self.path is None:
            return
        path, self.path = self.path, None
        atexit.unregister(self.release)
        if _read_owner(path) == self._token:
            path.unlink(missing_ok=True)

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The lock file's JSON, {} when it exists but cannot be parsed, None when it is absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _how_to_set(setting: str) -> str:
    """`output_dir` -> "output_dir=PATH" (a config key), `--out` -> "--out PATH" (a command-line flag)."""
    return f"{setting} PATH" if setting.startswith("-") else f"{setting}=PATH"


def _unwritable(folder: Path, what: Path, err: OSError, setting: str) -> OutputDirError:
    return OutputDirError(
        f"{setting} {folder} cannot be written: creating {what} failed ({err.strerror or err}). Give a folder this "
        f"user can write to ({_how_to_set(setting)} on the command line), or make this one writable (permissions, "
        "a read-write mount, free space)."
    )


def _make_folder(folder: str | os.PathLike, setting: str) -> Path:
    """`folder` as an absolute path, created (with its parents) if missing; OutputDirError if it cannot be."""
    path = Path(folder).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(path, path, err, setting) from err
    return path


def check_writable(folder: str | os.PathLike, *, setting: str) -> Path:
    """Create `folder` if needed and prove it writable by creating and removing a file in it (permission bits say
    nothing under root, nor about a read-only mount). `setting` names it in the error (`output_dir`, `--copy-to`).
    Returns the absolute folder; raises OutputDirError."""
    path = _make_folder(folder, setting)
    probe = path / f".vppo_write_probe_{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise _unwritable(path, probe, err, setting) from err
    return path


def lock_output_dir(output_dir: str | os.PathLike, *, setting: str = "output_dir") -> OutputDirLock:
    """Create `output_dir` if needed and take its lock; the single-process part of `claim_output_dir`.

    setting: how the user gave the folder (`output_dir`, or a flag such as `--out`), named in the errors.
    Raises OutputDirError when the folder cannot be written or another live run holds it.
    """
    folder = _make_folder(output_dir, setting)
    path = folder / LOCK_FILE
    token = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    for _ in range(2):  # a stale lock is removed once, then taken like a free one
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _remove_stale(path, token["host"], setting)
            continue
        except OSError as err:
            raise _unwritable(folder, path, err, setting) from err
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(token, fh)
        except OSError as err:
            path.unlink(missing_ok=True)
            raise _unwritable(folder, path, err, setting) from err
        return OutputDirLock(path, token)
    raise _in_use(path, _read_owner(path) or {}, setting)  # another run took it between our removal and our retry


def _in_use(path: Path, owner: dict[str, Any], setting: str) -> OutputDirError:
    who = (
        f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('since')} "
        f"(command: {owner.get('command')})"
        if owner
        else "a lock file that cannot be read"
    )
    return OutputDirError(
        f"{setting} {path.parent} is in use by another run: {who}; lock file {path}. Two runs in one folder "
        "would interleave their metrics and delete each other's checkpoints. Wait for that run or stop it, or "
        f"give this run another {_how_to_set(setting)}; if that run is no longer running (e.g. it ran on another "
        f"host), delete {path}."
    )


def _remove_stale(path: Path, host: str, setting: str) -> None:
    """Remove the lock at `path` if its owner is a process of this host that is gone; else raise OutputDirError."""
    owner = _read_owner(path)
    if owner is None:  # released meanwhile
        return
    pid = owner.get("pid")
    if not owner or owner.get("host") != host or not isinstance(pid, int) or _pid_alive(pid, owner.get("pid_start")):
        raise _in_use(path, owner, setting)
    print(
        f"WARNING: taking over {path}: its owner (pid {pid} on {host}, since {owner.get('since')}) is no longer "
        "running; it was stopped without releasing the folder.",
        file=sys.stderr,
        flush=True,
    )
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise _unwritable(path.parent, path, err, setting) from err


def claim_output_dir(output_dir: str | os.PathLike) -> OutputDirLock:
    """`lock_output_dir` on rank 0, its verdict shared with every rank (collective: every rank calls it, after the
    process group exists), so all ranks stop with the same message or all go on."""
    import torch.distributed as dist

    lock, error = OutputDirLock(None), None
    if dist.get_rank() == 0:
        try:
            lock = lock_output_dir(output_dir)
        except OutputDirError as err:
            error = str(err)
    verdict = [error]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise OutputDirError(verdict[0])
    return lock


class StopRequest:
    """SIGTERM / SIGINT as a request to stop at the next step boundary (see the module docstring).

    `signum` is the first signal received while `handling_signals()` is active, None before (a recipe built without
    its entry point, as the tests do, never handles signals and never stops early).
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: object) -> None:
        # Only a flag: the step in progress (a collective, a checkpoint write) must not be interrupted.
        if self.signum is None:
            self.signum = signum

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[StopRequest]:
        """Within the block, SIGTERM and SIGINT set `signum` instead of ending the process; the previous handlers
        come back after it. Python delivers signals to the main thread only: elsewhere this installs nothing."""
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self) -> int | None:
        """The signal any rank received (the largest number if they differ), None if none: the same on every rank.

        Collective: every rank calls it once per step, at the same point of the loop.
        """
        import torch
        import torch.distributed as dist

        flag = torch.tensor(float(self.signum or 0), device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def stopped_message(signum: int, step: int, output_dir: str | os.PathLike) -> str:
    """The line a run stopped by a signal prints: what stopped it, where, its latest checkpoint, how to go on."""
    from vppo_recipes.checkpointing import checkpoint_of_step

    name = signal.Signals(signum).name
    checkpoint = checkpoint_of_step(output_dir, step)
    saved = f"latest checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint yet"
    return f"stopped by {name} at step {step}; {saved}; resume with the same command"
