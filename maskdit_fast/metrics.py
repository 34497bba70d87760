"""What a training run reports: throughput / MFU, peak memory, and the metrics log.

    meter = ThroughputMeter(model, world_size, peak_flops=default_peak_flops(device))
    meter.update(images, mask_ratio)       # each step
    meter.summary()                        # images/s, tokens/s, TFLOP/s per device, MFU, peak memory

`TrainMetrics` is the trainer's use of them: every rank meters each step; every `log_every` steps
the step's numbers plus throughput and the peak memory of every rank go to metrics.jsonl and
TensorBoard (rank 0) and to the progress bar.
"""
import json
import os
import resource
import time

import torch

from maskdit_fast.flops import train_step_flops
from maskdit_fast.masking import num_kept
from maskdit_fast.parallel import all_gather_floats, unwrap

# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs; TF32 is half of it. Matched against
# torch.cuda.get_device_name; anything else needs an explicit peak.
PEAK_BF16_TFLOPS = {"B200": 2250.0, "H200": 989.4, "H100": 989.4, "A100": 312.0}


def default_peak_flops(device, dtype=torch.bfloat16):
    """Peak FLOP/s of one `device` for `dtype` training (bf16 / fp16 tensor cores, fp32 as TF32)
    from PEAK_BF16_TFLOPS, or None when unknown (CPUs, other GPUs: pass a peak explicitly)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12 * (0.5 if dtype == torch.float32 else 1.0)
    return None


def peak_memory_gib(device):
    """Peak memory of this process in GiB: CUDA max_memory_allocated on a GPU, the peak resident
    set size (ru_maxrss) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


class ThroughputMeter:
    """Images/s, tokens/s, achieved FLOP/s and MFU over a window of training steps.

    FLOPs come from the analytic counter `maskdit_fast.flops.train_step_flops` (forward + backward
    matmul work at the step's mask ratio), so MFU = achieved FLOP/s per device / peak_flops.

    Args:
        model: the DiT / MaskDiT (any wrapper).
        world_size: devices sharing each global batch.
        peak_flops: peak FLOP/s of one device (None: MFU is not reported).
        device: where peak memory is read.
    """

    def __init__(self, model, world_size=1, peak_flops=None, device="cpu"):
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops must be > 0 or None, got {peak_flops!r}")
        self.model = unwrap(model)
        self.world_size, self.peak_flops, self.device = int(world_size), peak_flops, torch.device(device)
        self._flops_cache = {}
        self.reset()

    def reset(self):
        """Starts a new window now."""
        self.start, self.images, self.tokens, self.flops = time.perf_counter(), 0, 0, 0

    def _flops_per_image(self, mask_ratio, input_size):
        # keyed by the kept-token count (what the FLOPs depend on): a scheduled ratio, new every step,
        # must not grow the cache without bound
        tokens = (input_size[0] // self.model.patch_size) * (input_size[1] // self.model.patch_size)
        key = (num_kept(tokens, mask_ratio), input_size)
        if key not in self._flops_cache:
            self._flops_cache[key] = train_step_flops(self.model, input_size=input_size, mask_ratio=mask_ratio)
        return self._flops_cache[key]

    def update(self, images, mask_ratio, input_size=None):
        """Counts `images` trained at `mask_ratio` and model input size `input_size` ((H, W); None = the
        model's own). One call per optimizer step, or per resolution group with mixed resolutions."""
        h, w = self.model.input_size if input_size is None else tuple(input_size)
        self.images += images
        self.tokens += images * (h // self.model.patch_size) * (w // self.model.patch_size)
        self.flops += images * self._flops_per_image(float(mask_ratio), (h, w))

    def summary(self, reset=True):
        """dict: images_per_s, tokens_per_s (input patch tokens), tflops_per_device (achieved),
        mfu (when peak_flops is set), peak_mem_gib (this rank); then a new window starts."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"images_per_s": self.images / elapsed,
               "tokens_per_s": self.tokens / elapsed,
               "tflops_per_device": self.flops / elapsed / self.world_size / 1e12,
               "peak_mem_gib": peak_memory_gib(self.device)}
        if self.peak_flops:
            out["mfu"] = self.flops / elapsed / self.world_size / self.peak_flops
        if reset:
            self.reset()
        return out


def _logged_step(line):
    """Step of a metrics.jsonl line; a line cut short by a crash counts as after any resume point."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class MetricsLog:
    """metrics.jsonl (one JSON object per record) plus TensorBoard scalars under tb/.

    Args:
        run_dir: where both go.
        resume_step: the step a resumed run continues from: records after it (to be redone) are
            dropped; None starts a new log (an existing metrics.jsonl is removed).
    """

    def __init__(self, run_dir, resume_step=None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if _logged_step(line) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        elif resume_step is None and os.path.exists(self.path):
            os.unlink(self.path)
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step)
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def write(self, step, **values):
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class TrainMetrics:
    """The trainer's reporting: a ThroughputMeter on every rank, and on rank 0 the MetricsLog and a
    tqdm progress bar (closed after the last step).

    Args:
        run_dir: where rank 0 writes metrics.jsonl and tb/.
        model: the model as trained (for FLOP counts); info: the parallel.DistInfo of this process.
        peak_flops: per-device peak for MFU (None: not reported).
        log_every, steps: a record every `log_every` steps and at step `steps` (the last).
        start_step: the step training starts from; resumed: whether it continues a checkpoint
            (its later records are dropped) or starts a new log.
        progress: show the progress bar (rank 0).
    """

    def __init__(self, run_dir, model, info, peak_flops, log_every, steps, start_step=0, resumed=False,
                 progress=True):
        from tqdm import tqdm
        self.log_every, self.steps = log_every, steps
        self.log = MetricsLog(run_dir, resume_step=start_step if resumed else None) if info.is_main else None
        self.meter = ThroughputMeter(model, info.world_size, peak_flops, info.device)
        self.bar = tqdm(total=steps, initial=start_step, disable=not (progress and info.is_main), dynamic_ncols=True)

    def step(self, step, metrics, mask_ratio, images, shapes=()):
        """Counts optimizer step `step` (1-based): `images` images at `mask_ratio`, split evenly over
        the mixed-resolution group sizes `shapes` (none: the model's own size). On a logging step
        adds mask_ratio, the throughput summary and the peak memory (the maximum over ranks, and
        each rank's with several) to `metrics` (a dict of floats) and writes them (rank 0).
        Collective on logging steps. Returns `metrics`."""
        for shape in shapes or [None]:
            self.meter.update(images // max(1, len(shapes)), mask_ratio, shape)
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.steps:
            metrics.update(mask_ratio=mask_ratio, **self.meter.summary())
            per_rank = all_gather_floats(metrics["peak_mem_gib"])
            metrics["peak_mem_gib"] = max(per_rank)
            if len(per_rank) > 1:
                metrics["peak_mem_gib_per_rank"] = per_rank
            self.write(step, **metrics)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.0f}",
                                 mask=mask_ratio)
        if step == self.steps:
            self.bar.close()
        return metrics

    def write(self, step, **values):
        """A record of `values` at `step` (rank 0; nothing elsewhere)."""
        if self.log is not None:
            self.log.write(step, **values)

    def close(self):
        self.bar.close()
        if self.log is not None:
            self.log.close()
