"""The checkpoints of a training run: one interface, `Checkpointer`, over both formats.

    ckpt = make_checkpointer(run_dir + "/checkpoints", model, optimizer, ema, sharded=world_size > 1)
    path, extra = ckpt.load_latest(required=("step",))   # resume: the newest checkpoint that verifies
    ckpt.save(step, {"step": step, ...})                 # model, optimizer, EMA + the extra state
    ckpt.wait(); ckpt.close()                            # asynchronous sharded saves finish

Single-process runs write `step_XXXXXXXX.pt` files (`FileCheckpointer`), distributed and FSDP runs
sharded `step_XXXXXXXX/` folders (`ShardedCheckpointer`, maskdit_fast.checkpoint.sharded). Both
live side by side in one directory: listing, "latest", pruning to the newest `keep_last` and
loading cover both, so a run resumes from either format at any world size.
"""
import os
import re
import shutil
import sys
import threading

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from maskdit_fast.checkpoint.files import CheckpointError, atomic_save, fsync_dir
from maskdit_fast.checkpoint.loading import load_training_state, load_weights
from maskdit_fast.checkpoint.sharded import commit, is_dcp_checkpoint, sharded_state
from maskdit_fast.parallel import barrier, broadcast_object, global_rank, is_distributed, unwrap

CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
DCP_RE = re.compile(r"^step_(\d+)$")


def list_checkpoints(directory):
    """{step: path} of the complete checkpoints in `directory`, both formats (single-file `.pt`
    and DCP directories; the directory wins if a step has both). Temp files/dirs are ignored."""
    found = {}
    if not os.path.isdir(directory):
        return found
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        m = CKPT_RE.match(name)
        if m and os.path.isfile(path):
            found.setdefault(int(m.group(1)), path)
        m = DCP_RE.match(name)
        if m and is_dcp_checkpoint(path):
            found[int(m.group(1))] = path
    return found


def latest_checkpoint(directory):
    """Path of the newest complete checkpoint in `directory` (a .pt file or a DCP folder), or None."""
    found = list_checkpoints(directory)
    return found[max(found)] if found else None


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def prune_checkpoints(directory, keep_last):
    """Deletes all but the newest `keep_last` checkpoints (both formats) and every temp file or
    directory (`*.tmp`, left by a crashed writer). Call only when no save is in flight."""
    found = list_checkpoints(directory)
    for step in sorted(found)[:-keep_last]:
        _remove(found[step])
    for name in os.listdir(directory):
        if name.endswith(".tmp"):
            _remove(os.path.join(directory, name))


def set_aside(path):
    """Renames a checkpoint that failed verification to `<path>.corrupt` (kept for inspection; no
    longer listed, resumed or counted by keep_last). Returns the new path."""
    target, n = path + ".corrupt", 1
    while os.path.exists(target):
        target, n = f"{path}.corrupt{n}", n + 1
    os.replace(path, target)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return target


class Checkpointer:
    """Saves and restores the model, optimizer and EMA of a run plus a dict of extra state (step,
    data position, RNG states, ...: plain containers and small tensors) as checkpoints in
    `directory`, keeping the newest `keep_last` (both formats counted). Every method except the
    listing (`steps`, `latest`, `newest_first`) must be called by all ranks.

    Args:
        directory: created if needed (under torchrun on a file system every rank sees).
        model: as trained (plain, DDP or FSDP2); optimizer: over its parameters; ema: ShardedEMA.
        keep_last: checkpoints kept (>= 1).
    """

    def __init__(self, directory, model, optimizer, ema, keep_last=3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory, self.keep_last = directory, keep_last
        self.model, self.optimizer, self.ema = model, optimizer, ema

    # -------------------------------------------------------------------------------- the directory
    def steps(self):
        """Sorted steps of the complete checkpoints present, both formats (temp files ignored)."""
        return sorted(list_checkpoints(self.directory))

    def latest(self):
        """Path of the newest complete checkpoint (a .pt file or a DCP directory), or None."""
        return latest_checkpoint(self.directory)

    def newest_first(self):
        """Paths of the complete checkpoints present, newest first."""
        found = list_checkpoints(self.directory)
        return [found[step] for step in sorted(found, reverse=True)]

    def path(self, step):
        """Where this checkpointer writes step `step`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- writing
    def save(self, step, extra):
        """Writes model, optimizer, EMA and `extra` as step `step` (atomically: a crash leaves the
        previous checkpoints as they were), then prunes to `keep_last`. Returns the final path
        (an asynchronous save appears there once written: `wait`)."""
        raise NotImplementedError

    def wait(self):
        """Blocks until a pending save is written; re-raises its error. Nothing to wait for here."""

    def close(self):
        """wait(), then frees what the saves held."""
        self.wait()

    # ------------------------------------------------------------------------------------- reading
    @property
    def _map_location(self):
        return next(unwrap(self.model).parameters()).device

    def load(self, path, required=("step",), verify=True):
        """Restores model, optimizer and EMA from the checkpoint `path` (either format, any world
        size; verified first unless verify=False, architecture-checked: see
        `load_training_state`). Returns its extra state, which must hold `required`."""
        return load_training_state(path, self.model, self.optimizer, self.ema, map_location=self._map_location,
                                   required=required, verify=verify)

    def load_latest(self, required=("step",)):
        """Loads the newest checkpoint in the directory that verifies. Corrupt, incomplete or
        unsafe ones are skipped and renamed to `<name>.corrupt` (saying so on stderr). Returns
        (path, extra state), or (None, None) when there is none."""
        for path in broadcast_object(self.newest_first()):  # rank 0's view: every rank tries the same
            try:
                return path, self.load(path, required)
            except CheckpointError as e:  # raised before anything was loaded, on every rank
                barrier()  # no rank still reads it
                if global_rank() == 0:
                    print(f"warning: skipped checkpoint {path}: {e}; moved it to {set_aside(path)}", file=sys.stderr,
                          flush=True)
        return None, None

    def load_weights(self, path, verify=True):
        """Model and EMA weights only (a new training stage: the optimizer stays as it is) from the
        checkpoint `path`; see `maskdit_fast.checkpoint.load_weights`. Returns its step."""
        return load_weights(path, self.model, self.ema, map_location=self._map_location, verify=verify)


class FileCheckpointer(Checkpointer):
    """One `step_XXXXXXXX.pt` file per checkpoint holding {**extra, "model", "ema", "optimizer"}
    (the model's state_dict, full; the optimizer's, parameters numbered): single-process runs."""

    def __init__(self, directory, model, optimizer, ema, keep_last=3):
        super().__init__(directory, model, optimizer, ema, keep_last)
        os.makedirs(directory, exist_ok=True)

    def path(self, step):
        return os.path.join(self.directory, f"step_{step:08d}.pt")

    def save(self, step, extra):
        path = self.path(step)
        atomic_save(dict(extra, model=unwrap(self.model).state_dict(), ema=self.ema.state_dict(),
                         optimizer=self.optimizer.state_dict()), path)
        prune_checkpoints(self.directory, self.keep_last)  # also clears a crashed writer's temp files
        return path


class ShardedCheckpointer(Checkpointer):
    """Sharded DCP folders `step_XXXXXXXX/` (every rank writes its shards; rank 0 commits, see
    maskdit_fast.checkpoint.sharded): distributed and FSDP runs.

    Args:
        async_save: write in a background thread (dcp.async_save): `save` returns once the state
            is staged to CPU memory; the checkpoint appears when the write completes. `wait()`
            (or `close()`) before exit. Needs a process group (torchrun); a single process
            without one saves synchronously.
    """

    def __init__(self, directory, model, optimizer, ema, keep_last=3, async_save=False):
        super().__init__(directory, model, optimizer, ema, keep_last)
        self.async_save, self.rank = async_save and is_distributed(), global_rank()
        if self.rank == 0:
            os.makedirs(directory, exist_ok=True)
        barrier()
        self._pending, self._committer, self._error = None, None, None
        self._group = None
        if self.async_save:
            # the background thread's collectives get their own gloo group: sharing the training
            # group would interleave them with the training collectives (and NCCL needs the main
            # thread's CUDA streams)
            self._group = dist.new_group(backend="gloo")

    def path(self, step):
        return os.path.join(self.directory, f"step_{step:08d}")

    def save(self, step, extra):
        """As Checkpointer.save; `extra` is rank 0's (it must be the same on every rank). Waits
        for a previous asynchronous save first."""
        self.wait()
        final, tmp = self.path(step), self.path(step) + ".tmp"
        if self.rank == 0:
            prune_checkpoints(self.directory, self.keep_last)  # also clears a crashed save's temp dirs
        barrier()
        state = sharded_state(self.model, self.optimizer, self.ema)
        if not self.async_save:
            dcp.save(state, checkpoint_id=tmp, no_dist=not is_distributed())
            if self.rank == 0:
                self._commit(tmp, final, extra)
            barrier()
            return final
        result = dcp.async_save(state, checkpoint_id=tmp, process_group=self._group)
        future = result if hasattr(result, "add_done_callback") else result.upload_completion
        if self.rank == 0:  # commits once the write is done, without blocking training
            self._committer = threading.Thread(target=self._commit_async, args=(future, tmp, final, extra))
            self._committer.start()
        self._pending = future
        return final

    def _commit(self, tmp, final, extra):
        commit(tmp, final, extra)
        prune_checkpoints(self.directory, self.keep_last)

    def _commit_async(self, future, tmp, final, extra):
        try:
            future.result()
            self._commit(tmp, final, extra)
        except BaseException as e:  # re-raised on the main thread by wait()
            self._error = e

    def wait(self):
        if self._pending is not None:
            try:
                self._pending.result()
                if self._committer is not None:
                    self._committer.join()
            finally:
                self._pending = self._committer = None
            barrier()  # every rank sees the committed directory afterwards
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"asynchronous checkpoint save failed: {error}") from error

    def close(self):
        self.wait()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


def make_checkpointer(directory, model, optimizer, ema, sharded=False, keep_last=3, async_save=False):
    """The Checkpointer of a run: sharded DCP folders when `sharded` (world size > 1 or FSDP; with
    `async_save` written in the background), else single files."""
    if sharded:
        return ShardedCheckpointer(directory, model, optimizer, ema, keep_last, async_save=async_save)
    return FileCheckpointer(directory, model, optimizer, ema, keep_last)
