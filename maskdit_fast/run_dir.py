"""The run dir: one trainer at a time (`RunDirLock`), and a previous run's outputs either continued
(--resume auto), moved aside (--restart) or refused (--resume never), never mixed with a new run's.

    runs/<name>/.lock, config.json, metrics.jsonl, tb/, checkpoints/, grid_*.png|npz, ema.safetensors
"""
import fcntl
import os
import socket
import time

RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json", "tb", "ema.safetensors")  # plus grid_*


class RunDirLock:
    """An exclusive lock on a run dir (`<run_dir>/.lock`, fcntl.flock): one trainer per run dir.

    The operating system releases it when the holder exits or dies, so a crash or kill -9 leaves
    nothing stuck. Under torchrun only rank 0 takes it and the other ranks of the run act under
    it (maskdit_fast.train shares rank 0's verdict with them): a second job on the same run dir
    fails on all its ranks. The lock file names the holder (pid and host) for that error.
    """

    NAME = ".lock"

    def __init__(self, run_dir):
        self.run_dir, self.path, self._fd = run_dir, os.path.join(run_dir, self.NAME), None

    def acquire(self):
        """Creates the run dir if needed and takes the lock (RuntimeError naming the holder when
        another process has it). Returns self."""
        os.makedirs(self.run_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise RuntimeError(f"run dir {self.run_dir!r} is in use by another trainer ({holder}): two trainers "
                               f"would overwrite each other's checkpoints and logs. Stop it, or pass another "
                               f"--run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self):
        """Drops the lock (closing the descriptor releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def previous_outputs(run_dir):
    """Names of a previous run's outputs in `run_dir` (what the trainer writes there), sorted."""
    if not os.path.isdir(run_dir):
        return []
    names = [n for n in os.listdir(run_dir)
             if n in RUN_OUTPUTS or (n.startswith("grid_") and n.endswith((".png", ".npz")))]
    return sorted(n for n in names if not (n == "checkpoints" and not os.listdir(os.path.join(run_dir, n))))


def open_run_dir(cfg, run_dir):
    """Creates and locks the run dir (one trainer per run dir; call on rank 0 only). A previous
    run's outputs there are moved aside with cfg.restart (to previous-<time>/, nothing deleted),
    and refused with cfg.resume "never" (they would be mixed with this run's: pruned by its
    --keep-last, resumed by a later run). Returns the held RunDirLock."""
    lock = RunDirLock(run_dir).acquire()
    try:
        previous = previous_outputs(run_dir)
        if previous and cfg.restart:
            base = aside = os.path.join(run_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
            n = 1
            while os.path.exists(aside):
                aside, n = f"{base}-{n}", n + 1
            os.makedirs(aside)
            for name in previous:
                os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
            print(f"--restart: moved the previous run's {', '.join(previous)} to {aside}")
        elif previous and cfg.resume == "never":
            raise ValueError(f"--resume never: run dir {run_dir!r} holds a previous run's {', '.join(previous)}; "
                             f"they would mix with this run's (checkpoints pruned and resumed as its own). Pass "
                             f"--restart to move them aside and start over, --resume auto to continue that run, "
                             f"or another --run-dir")
    except BaseException:
        lock.release()
        raise
    return lock
