"""EMA decay schedule (the EMA itself is `maskdit_fast.parallel.ShardedEMA`)."""


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
