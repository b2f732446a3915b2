"""
run_files.py: what every script of this project does with files, in one place.

Bad input ends a run with one line naming the file or setting and the fix, never a traceback
(InputError; train_gpt.run_main prints it). Everything is written to a temporary file and renamed
into place, so nothing is ever half-written (atomic_write_bytes). Output folders are probed before any
work (check_writable), one training at a time owns its OUTPUT_DIR (claim_output_dir), and trained
weights whose folder is full go where there is room (write_artifact). The log writer (Logger) keeps
one grammar, `tag key:value ... # comment` (log_value escapes a value), read by records/log_format.py,
and a full disk never stops a run for its log.

A job that outgrew train_gpt.py: it imports nothing of the project, and its bytes count wherever
train_gpt.py's do (code_size.EVALUATION_CODE).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

class InputError(Exception):
    """A problem with the user's data, files or settings, explained in one line."""

def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """A temporary file beside `path`, renamed into place. It never outlives a failure, and one a
    killed run left behind is removed here (each path has one writer: leftovers are stale)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if getattr(e, "errno", None) == errno.ENOSPC:
            raise InputError(f"{path}: no space left to write {len(data)} bytes; free space and rerun") from None
        raise

def check_writable(folder: Path, setting: str) -> None:
    """Creates the folder and a probe file in it now: a bad output path fails before training."""
    probe = folder / f".write_probe{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{setting}: cannot write in {folder} ({e.strerror}); choose a writable folder") from None

# A folder's training: the lock files this process holds, by folder (the OS frees them when it ends).
OUTPUT_LOCKS: dict[Path, object] = {}

def claim_output_dir(folder: Path, run_id: str, rank: int, world_size: int, device: torch.device) -> None:
    """One training at a time writes into a folder: rank 0 holds an exclusive lock on .train.lock there
    until release_output_dir (or its end, however it ends: the OS frees the lock), so a second training
    into the same OUTPUT_DIR is refused at start instead of replacing the first's artifact under it (its
    log would then report the other run's figures). Every rank learns the verdict, so all stop alike."""
    problem = ""
    if rank == 0:
        release_output_dir(folder)  # this process's earlier training into the folder is over
        lock = folder / ".train.lock"
        try:
            handle = open(lock, "a+", encoding="utf-8")
        except OSError as e:
            problem = f"cannot open {lock} ({e.strerror}); remove it or give this run an OUTPUT_DIR of its own"
        else:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another training"
                handle.close()
                problem = (f"is in use by a training still running ({holder}); wait for it to end, or give this "
                           "run an OUTPUT_DIR of its own")
            except OSError as e:  # a file system without locks (some network mounts)
                handle.close()
                problem = (f"cannot be locked for this run ({lock}: {e.strerror}); choose an OUTPUT_DIR on a local "
                           "disk")
            else:
                handle.seek(0)
                handle.truncate()
                handle.write(f"run_id:{run_id} pid:{os.getpid()}")
                handle.flush()
                OUTPUT_LOCKS[folder.resolve()] = handle
    refused = torch.tensor(int(bool(problem)), device=device)
    if world_size > 1:
        dist.all_reduce(refused, op=dist.ReduceOp.MAX)
    if refused.item():
        raise InputError(f"OUTPUT_DIR={folder} {problem or 'was refused on rank 0'}")

def release_output_dir(folder: Path) -> None:
    """Ends this process's hold on the folder (a training that returned; a no-op where none is held)."""
    handle = OUTPUT_LOCKS.pop(folder.resolve(), None)
    if handle is not None:
        handle.close()

def write_artifact(path: Path, blob: bytes, run_id: str, log) -> Path:
    """The artifact at path or, where that fails (a full disk), in the first folder that takes it: the
    temporary folder, the working directory, the home folder. The log says where: trained weights are
    never lost to a full OUTPUT_DIR. Returns where it went."""
    try:
        atomic_write_bytes(path, blob)
        return path
    except (InputError, OSError) as e:
        first_error = e
    for folder in (Path(tempfile.gettempdir()), Path.cwd(), Path.home()):
        fallback = folder / f"{path.stem}.{run_id}{path.suffix}"
        try:
            atomic_write_bytes(fallback, blob)
        except (InputError, OSError):
            continue
        earlier = " (the file there now is an earlier run's)" if path.exists() else ""
        log(f"warning artifact_path:{log_value(path)} written_to:{log_value(fallback)} # {log_value(first_error)}; "
            f"the trained weights are kept there: move the file into place once there is room{earlier}")
        return fallback
    raise InputError(f"{first_error}; no other folder (temporary, working, home) could take the {len(blob)} bytes "
                     "either: free space and rerun")

def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

def log_value(value) -> str:
    """A value as log lines write it (records/log_format.py reads it back): % and white space as %XX of UTF-8."""
    return "".join("".join(f"%{b:02X}" for b in c.encode()) if c == "%" or c.isspace() else c for c in str(value))

class Logger:
    """Prints a line and appends it to the log file; silent where path is None (ranks other than 0).
    A write that fails (a full disk) never stops the run: the log so far is renamed to <log>.incomplete
    (a rename needs no room, and a rerun with the same RUN_ID is not refused for a half log), one warning
    goes to stderr, and the lines go on to the console only."""
    active: "Logger | None" = None  # the latest log opened: run_main adds the error that ends a run to it
    def __init__(self, path: Path | None):
        self.path, self.failed = path, False
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            Logger.active = self
    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        if self.failed:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")
        except OSError as e:
            self.failed = True
            kept = self.path.with_name(self.path.name + ".incomplete")
            try:
                os.replace(self.path, kept)
            except OSError:
                kept = self.path
            print(f"warning log:{log_value(self.path)} write_failed:{log_value(e.strerror)} kept_as:{log_value(kept)} "
                  "# the run goes on, its lines on the console only; free space before the next run",
                  file=sys.stderr, flush=True)
    def code(self, *paths: Path | str) -> None:
        """The source of the code that runs, byte for byte, in the log file only (as the challenge's logs carry it)."""
        for path in paths:
            text = (raw := Path(path).read_bytes()).decode("utf-8")
            self(f"code file:{log_value(Path(path).name)} bytes:{len(raw)} sha256:{hashlib.sha256(raw).hexdigest()} "
                 f"lines:{len(text.splitlines())} final_newline:{int(text.endswith(chr(10)))}\n"
                 + text.removesuffix("\n"), console=False)
