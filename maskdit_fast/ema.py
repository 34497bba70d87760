"""EMA decay schedule (the EMA itself is `maskdit_fast.parallel.ShardedEMA`)."""


def ema_decay(step, decay, warmup=True):
    """Decay used at optimizer step `step` (0-based): `decay`, or with warm-up
    min(decay, (1 + step) / (10 + step)) so early averages are not dominated by the random init."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay
