"""torchrun worker of tests/test_distributed.py: runs the trainer CLI (maskdit_fast.train.main) with
the flags it is given, watched and broken from outside the trainer's code (it wraps the trainer's
`save_checkpoint`):

    torchrun --nproc_per_node 2 --standalone tests/train_worker.py [--kill-last-rank-at STEP] <train flags>

--kill-last-rank-at STEP: the last rank SIGKILLs itself when the trainer comes to save step STEP
(trained and logged, not yet checkpointed): a rank that dies mid-run.
Under --parallel ddp every rank also writes its model weights at every checkpoint to
<run dir>/replica_<rank>_<step>.pt: a checkpoint holds one replica, the test compares them all.
"""
import os
import signal
import sys

import torch

from maskdit_fast import train as T
from maskdit_fast.parallel import unwrap


def main(argv):
    kill_at = None
    if argv[:1] == ["--kill-last-rank-at"]:
        kill_at, argv = int(argv[1]), argv[2:]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    save = T.save_checkpoint

    def watched_save(ckpt, cfg, state, meta):
        if state.step == kill_at and rank == world_size - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.parallel == "ddp":
            weights = {k: v.detach().clone() for k, v in unwrap(state.net).state_dict().items()}
            torch.save(weights, os.path.join(cfg.run_dir, f"replica_{rank}_{state.step}.pt"))
        return save(ckpt, cfg, state, meta)

    T.save_checkpoint = watched_save
    T.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
