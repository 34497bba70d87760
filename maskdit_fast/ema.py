"""The exponential moving average of the weights (what is sampled and exported) and its decay schedule.

    ema = ShardedEMA(model)                          # fp32 copy, sharded like the parameters
    ema.update(model, ema_decay(step, 0.9999, warmup=True, restart=None))   # after each optimizer step

`restart` starts the average over at a given step (the trainer's --ema-restart: the first step of
the unmasked phase), so the sampled weights hold nothing of the steps before it.
"""
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from maskdit_fast.parallel import global_rank, local_tensor, nonfinite, unwrap


def ema_decay(step, decay, warmup=True, restart=None):
    """Decay used at optimizer step `step` (0-based): `decay`, or with warm-up
    min(decay, (1 + step) / (10 + step)) so early averages are not dominated by the random init.

    restart: a step at which the average starts over (e.g. the first step of an unmasked phase):
    decay 0 there (the EMA becomes the weights), after it the schedule counted from `restart`.
    """
    if restart is not None and step >= restart:
        if step == restart:
            return 0.0
        step -= restart
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


class ShardedEMA:
    """Exponential moving average of a (possibly FSDP2-sharded) model, in fp32.

    Each EMA tensor is a copy of the model's parameter (or floating buffer) with the same
    placement: under FSDP2 a DTensor holding exactly this rank's shard, so the update is local
    (no communication) and the memory is divided by the world size; under DDP / one process a
    plain tensor. Names are the model's state_dict keys (wrapper prefixes removed), so
    `state_dict()` checkpoints with torch.distributed.checkpoint and `full_state_dict()` loads
    into an unwrapped model.

    Args:
        model: the model as trained (plain, DDP, or after apply_fsdp), its parameters holding the
            initial EMA weights.
    """

    def __init__(self, model):
        self.names, self.shadow = [], []
        for name, t in self._live(model):
            self.names.append(name)
            self.shadow.append(t.detach().to(torch.float32, copy=True))

    @staticmethod
    def _live(model):
        # state_dict(keep_vars=True): the live parameters and buffers under their checkpoint names
        return [(k, t) for k, t in unwrap(model).state_dict(keep_vars=True).items() if t.is_floating_point()]

    def nonfinite(self):
        """0-d float tensor: 1.0 when this rank's EMA holds a NaN or infinity (which the EMA of a
        model takes from the first non-finite weights of an update), else 0.0. No host sync."""
        return nonfinite(self.shadow)

    @torch.no_grad()
    def update(self, model, decay):
        """ema <- decay * ema + (1 - decay) * model, on the local shards (fp32 arithmetic)."""
        live = self._live(model)
        if [n for n, _ in live] != self.names:
            raise RuntimeError("ShardedEMA.update: the model's parameters differ from the ones the EMA was built from")
        model_t = [local_tensor(t).float() for _, t in live]
        torch._foreach_lerp_([local_tensor(e) for e in self.shadow], model_t, 1.0 - decay)

    def state_dict(self):
        """name -> fp32 tensor (DTensor shards under FSDP2), the live EMA storage (for DCP)."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Copies name -> tensor values in. Each value may be full (a plain tensor of the
        parameter's full shape, e.g. from a single-file checkpoint or an EMA module) or already
        sharded like this EMA (a DTensor); missing or unexpected names raise RuntimeError."""
        missing, unexpected = set(self.names) - set(state_dict), set(state_dict) - set(self.names)
        if missing or unexpected:
            raise RuntimeError(f"EMA state dict mismatch: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
        for name, dst in zip(self.names, self.shadow):
            src = state_dict[name]
            if isinstance(dst, DTensor) and not isinstance(src, DTensor):
                src = distribute_tensor(src.to(dst.device, torch.float32), dst.device_mesh, dst.placements)
            if tuple(src.shape) != tuple(dst.shape):
                raise RuntimeError(f"EMA {name}: shape {tuple(src.shape)} != {tuple(dst.shape)}")
            local_tensor(dst).copy_(local_tensor(src))

    @torch.no_grad()
    def full_state_dict(self, rank0_only=False):
        """name -> full fp32 CPU tensor, gathering the shards one tensor at a time. Under FSDP2
        this is a collective: every rank must call it. With rank0_only, other ranks get {}."""
        out = {}
        is_main = global_rank() == 0
        for name, t in zip(self.names, self.shadow):
            full = t.full_tensor() if isinstance(t, DTensor) else t
            if is_main or not rank0_only:
                out[name] = full.detach().to("cpu", copy=True)
        return out
