"""torchrun worker of tests/test_distributed.py: runs the trainer CLI (maskdit_fast.train.main) with
the flags it is given and, under --parallel ddp, also writes this rank's model weights at every
checkpoint to <run dir>/replica_<rank>_<step>.pt: a checkpoint holds one replica, the test compares
them all.

    torchrun --nproc_per_node 2 --standalone tests/train_worker.py <maskdit_fast.train flags>
"""
import os
import sys

import torch

from maskdit_fast import train as T
from maskdit_fast.parallel import unwrap


def main(argv):
    cfg = T.parse_config(argv)
    save = T.save_checkpoint

    def save_and_dump(ckpts, cfg, state, meta):
        if cfg.parallel == "ddp":
            weights = {k: v.detach().clone() for k, v in unwrap(state.net).state_dict().items()}
            torch.save(weights, os.path.join(cfg.run_dir, f"replica_{os.environ['RANK']}_{state.step}.pt"))
        return save(ckpts, cfg, state, meta)

    T.save_checkpoint = save_and_dump
    T.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
