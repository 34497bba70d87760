"""Checkpoints: crash-safe, verified, loadable at any world size, never running code from a file.

The trainer uses one interface, `Checkpointer` (`make_checkpointer`): `save(step, extra)`,
`load(path)`, `load_latest()`, `load_weights(path)`, `latest()`, `wait()`, `close()`, the same
for both formats:

    checkpoints/step_00001000.pt    single-process runs: model, optimizer, EMA and the extra state
                                    in one file (`FileCheckpointer`)
    checkpoints/step_00001000/      distributed / FSDP runs: a sharded torch.distributed.checkpoint
                                    folder plus train_state.pt (`ShardedCheckpointer`, `sharded`)

Guarantees (tests: tests/test_checkpoint*.py, tests/test_train_reliability.py):
- Crash safety: every write goes to a temp file / folder that is renamed into place once complete
  (fsynced), so a crash or kill -9 mid-save leaves the previous checkpoint as the latest.
- No code runs from a file: `.pt` files load with torch.load(weights_only=True); a sharded folder's
  `.metadata` is read by an unpickler restricted to DCP's metadata types, its non-tensor entries
  weights-only.
- Integrity: `.pt` zip CRC-32s are checked on every load; sharded folders record the size and
  CRC-32 of each file at commit, verified before anything loads, and count only when complete.
  A checkpoint that fails raises `CheckpointError`; `load_latest` falls back to the newest one
  that verifies, renaming the others to `<name>.corrupt`.
- Any world size: tensors are stored with global shapes and names, so either format loads into
  FSDP2, DDP or one process (`load_training_state`, `load_weights`).

The EMA weights of any checkpoint export to one safetensors file (no GPU, no process group):

    python -m maskdit_fast.checkpoint runs/x/checkpoints/step_00010000 ema.safetensors
"""
from maskdit_fast.checkpoint.checkpointer import (Checkpointer, FileCheckpointer, ShardedCheckpointer,
                                                  latest_checkpoint, list_checkpoints, make_checkpointer,
                                                  prune_checkpoints, set_aside)
from maskdit_fast.checkpoint.files import (CheckpointError, atomic_save, atomic_write, export_safetensors,
                                           load_checkpoint)
from maskdit_fast.checkpoint.loading import (check_architecture, export_ema_safetensors, load_ema_state,
                                             load_training_state, load_weights, verify_checkpoint, verify_everywhere)
from maskdit_fast.checkpoint.sharded import is_dcp_checkpoint, read_dcp_metadata

__all__ = ["CheckpointError", "Checkpointer", "FileCheckpointer", "ShardedCheckpointer", "atomic_save", "atomic_write",
           "check_architecture", "export_ema_safetensors", "export_safetensors", "is_dcp_checkpoint",
           "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_ema_state", "load_training_state",
           "load_weights", "make_checkpointer", "prune_checkpoints", "read_dcp_metadata", "set_aside",
           "verify_checkpoint", "verify_everywhere"]
