"""The train-step section and the CPU figure: EDM loss, backward and AdamW of each variant
(cases.TRAIN_VARIANTS) on random latents, built the way the trainer builds a run.

The reference rows are the model with backend "torch": plain PyTorch (nn.Linear, LayerNorm, SDPA,
index ops) computing the official MaskDiT / DiT math. Its parameter names are the official ones
(`maskdit_fast.official.from_official` loads official checkpoints with strict=True) and
tests/test_models.py checks its forward against an independent re-implementation of the official
forwards on the same weights; "reference + compile" is that model under `torch.compile` (whole
model), what a user of the official code would run instead of this package.

Each variant goes through the trainer's own pieces (maskdit_fast.train: `parallelize` for fp8 and
compile, `build_optimizer` for fused AdamW and the CUDA-graph gradient buffers, `build_loss`,
`compile_warmup_steps`), so a row measures what `python -m maskdit_fast.train` runs with the same
options. A step draws its masks, noise levels and noise outside the network, as the trainer does
(no random numbers inside a compiled graph); EMA, clipping and logging are not part of it.
"""
import gc
import time

import torch

from maskdit_fast import train as trainer
from maskdit_fast.backend import triton_available
from maskdit_fast.bench.cases import TrainVariant, train_baseline, train_rows
from maskdit_fast.bench.timing import Stats, Timer, time_calls
from maskdit_fast.config import TrainConfig
from maskdit_fast.diffusion import EDMPrecond
from maskdit_fast.flops import train_step_flops
from maskdit_fast.masking import random_masking_ids
from maskdit_fast.metrics import default_peak_flops, peak_memory_gib
from maskdit_fast.models import create_model
from maskdit_fast.parallel import DistInfo


def _precision(variant, dtype):
    if variant.fp8:
        return "fp8"
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def train_config(variant, batch, dtype, compile_backend="inductor", seed=0):
    """The TrainConfig whose trainer options this variant measures (validated)."""
    return TrainConfig(model=variant.preset, batch_size=batch, mask_ratio=variant.mask_ratio,
                       precision=_precision(variant, dtype), ops_backend=variant.backend,
                       compile=bool(variant.compile), compile_scope=variant.compile or "blocks",
                       cuda_graphs=variant.cuda_graphs, compile_backend=compile_backend, lr=1e-4, seed=seed).validate()


def build_train_step(variant, batch, input_size, device, dtype, compile_backend="inductor", seed=0):
    """One training step of `variant` at `batch` samples of input_size^2 latents on `device`.

    dtype: bfloat16 (autocast, or fp8 linears for variant.fp8) or float32. Returns (step, model,
    warmup_steps): step() runs forward + backward + AdamW on a fixed random batch with fresh
    masks / noise and returns the loss (detached); model is the network (flop counting);
    warmup_steps is how many first steps compile or record graphs (0 eager).
    """
    device = torch.device(device)
    tc = train_config(variant, batch, dtype, compile_backend, seed)
    with torch.random.fork_rng(devices=[]), device:  # init on the device: an XL init on the CPU takes seconds
        torch.manual_seed(seed)
        model = create_model(variant.preset, backend=variant.backend, check_inputs=False, input_size=input_size,
                             **variant.overrides)
    net = trainer.parallelize(tc, model, DistInfo(0, 1, 0, device))
    opt = trainer.build_optimizer(tc, net)
    loss_fn, precond = trainer.build_loss(tc), EDMPrecond(net, tc.sigma_data)
    graphs = trainer.cuda_graphs(tc)
    gen = torch.Generator(device).manual_seed(seed)
    h, w = model.input_size
    length = (h // model.patch_size) * (w // model.patch_size)
    x = torch.randn(batch, model.in_channels, h, w, device=device, generator=gen)
    y = torch.randint(0, model.num_classes + 1, (batch,), device=device, generator=gen)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=tc.precision in ("bf16", "fp8"))

    def step():
        ids_keep = random_masking_ids(batch, length, variant.mask_ratio, gen)[0] if variant.mask_ratio else None
        sigma = loss_fn.sample_sigma(batch, device, gen)
        noise = torch.randn(x.shape, device=device, generator=gen)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(**autocast):
            loss = loss_fn(precond, x, y, mask_ratio=variant.mask_ratio, ids_keep=ids_keep, sigma=sigma,
                           noise=noise).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=not graphs)  # CUDA graphs: gradient buffers stay (trainer.build_optimizer)
        return loss.detach()

    return step, model, len(trainer.compile_warmup_steps(tc, 0))


def fit_batch(peak_bytes_at, capacity, max_batch, multiple=8, probes=(8, 16), safety=0.88):
    """Largest batch (a multiple of `multiple`, <= max_batch) predicted to fit in `capacity` bytes.

    peak_bytes_at(b) -> peak memory of a step at batch b; two probes give a linear model
    peak(b) = fixed + per_item * b, solved for safety * capacity.
    """
    b0, b1 = probes
    p0, p1 = peak_bytes_at(b0), peak_bytes_at(b1)
    per_item = max((p1 - p0) / (b1 - b0), 1.0)
    fixed = p0 - per_item * b0
    batch = int((safety * capacity - fixed) / per_item) // multiple * multiple
    return max(multiple, min(max_batch, batch))


def _is_oom(err):
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _release(compiled):
    """Frees what a finished row held: compiled graphs (and their CUDA-graph pools), cached blocks."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def eager_twin(variant):
    """The eager variant with the same model and back-end (its fitted batch serves the compiled rows)."""
    return TrainVariant(variant.label, variant.preset, variant.overrides, variant.backend, variant.mask_ratio)


def fitted_batch(variant, input_size, cfg):
    """The largest batch of the variant's eager twin that fits the GPU (two probe batches give a
    linear memory model, see fit_batch); cfg.fixed_batch off CUDA (no memory probe there)."""
    device = torch.device(cfg.device)
    if device.type != "cuda":
        return cfg.fixed_batch
    twin = eager_twin(variant)

    def probe(b):
        step, _, _ = build_train_step(twin, b, input_size, device, cfg.dtype)
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del step
        _release(False)
        return peak

    return fit_batch(probe, torch.cuda.get_device_properties(device).total_memory, cfg.max_batch)


def first_steps(variant, batch, input_size, cfg):
    """Builds the step and runs its first steps (compilation / graph recording: at least one).
    Shrinks the batch by 20 % on CUDA out-of-memory. Returns (step, model, batch, first_s, n_first,
    loss of the first step)."""
    device = torch.device(cfg.device)
    for _attempt in range(4):
        try:
            step, model, warmup = build_train_step(variant, batch, input_size, device, cfg.dtype, cfg.compile_backend)
            n_first = max(1, warmup)
            start = time.perf_counter()
            loss = float(step())  # the same seed in every row: comparable first losses
            for _ in range(n_first - 1):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return step, model, batch, time.perf_counter() - start, n_first, loss
        except Exception as err:  # noqa: BLE001
            if not _is_oom(err) or batch <= 8:
                raise
        # Outside the except block: its traceback keeps the failed attempt's tensors alive.
        step = model = None
        _release(bool(variant.compile))
        batch = max(8, int(batch * 0.8) // 8 * 8)
    raise RuntimeError(f"{variant.label}: out of memory down to batch {batch}")


def train_figures(model, batch, mask_ratio, ms, device, peaks):
    """images/s, TFLOP/s, MFU (vs the measured matmul peak and, on known cards, the nominal bf16
    peak) and CUDA peak memory for a step of `ms` milliseconds."""
    out = dict(images_per_s=batch / ms * 1e3, params_M=sum(p.numel() for p in model.parameters()) / 1e6)
    if torch.device(device).type == "cuda":
        out["peak_mem_GiB"] = peak_memory_gib(device)
    out["TFLOPs"] = train_step_flops(model, batch=batch, mask_ratio=mask_ratio) / ms / 1e9
    if peaks and peaks.get("matmul_TFLOPs"):
        out["mfu"] = out["TFLOPs"] / peaks["matmul_TFLOPs"]
    nominal = default_peak_flops(device)  # the card's nominal dense bf16 peak (the trainer's MFU basis)
    if nominal:
        out["mfu_nominal"] = out["TFLOPs"] * 1e12 / nominal
    return out


def run_train_variant(variant, batch, input_size, cfg, peaks, timer_factory=Timer):
    """Times one variant at `batch` (after its first steps, whose compile time is reported apart as
    compile_s: their wall time minus as many timed steps). Returns the row's figures."""
    device = torch.device(cfg.device)
    step, model, batch, first_s, n_first, loss = first_steps(variant, batch, input_size, cfg)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats = time_calls(step, device, cfg.train_warmup, cfg.train_reps, timer_factory(device))
        row = dict(variant=variant.label, model=variant.preset, backend=variant.backend,
                   mask_ratio=variant.mask_ratio, compile=variant.compile or None, cuda_graphs=variant.cuda_graphs,
                   precision=_precision(variant, cfg.dtype), batch=batch, input_size=model.input_size[0],
                   px=8 * model.input_size[0], ms=stats.median_ms, p10_ms=stats.p10_ms, p90_ms=stats.p90_ms,
                   n=stats.n, loss=loss, **train_figures(model, batch, variant.mask_ratio, stats.median_ms, device,
                                                        peaks))
        if variant.compile:
            row["compile_s"] = max(0.0, first_s - n_first * stats.median_ms / 1e3)
        return row
    finally:
        del step, model
        _release(bool(variant.compile))


def train_unavailable(variant, cfg):
    """(status, reason) when `variant` does not run in this config / on this device, else None;
    decided by explicit capabilities (device type, the built extension, triton, torchao + float8)."""
    device = torch.device(cfg.device)
    if variant.backend in ("auto", "triton") and device.type != "cuda":
        return "skipped", f"the {variant.backend} back-end variant needs a CUDA GPU"
    if variant.compile and not cfg.compile:
        return "skipped", f"torch.compile off in mode {cfg.mode}"
    if variant.cuda_graphs and device.type != "cuda":
        return "skipped", "CUDA graphs need a CUDA device"
    if variant.backend == "auto":
        from maskdit_fast.backend import extension_available, extension_unavailable_reason
        if not extension_available():  # "auto" would run the torch glue ops: not the fused row
            return "unavailable", f"the CUDA extension is not available: {extension_unavailable_reason()}"
    if variant.backend == "triton" and not triton_available():
        return "unavailable", "triton is not installed"
    if variant.fp8:
        from maskdit_fast.fp8 import check_fp8_device
        try:
            check_fp8_device(device)
        except RuntimeError as err:  # torchao missing or no float8 tensor cores: its message says which
            return "unavailable", str(err)
    return None


def run_train_section(cfg, budget, peaks, timer_factory=Timer):
    """Rows for every train_rows(cfg) entry (variant x latent size x batch rule), with `vs_baseline` =
    images/s over the reference MaskDiT's (train_baseline) at the same size and batch rule. A row
    whose batch equals one measured already (fit == common) reuses that measurement."""
    rows, measured, fitted = [], {}, {}
    for r in train_rows(cfg):
        v = r.variant
        base = dict(variant=v.label, model=v.preset, input_size=r.input_size, px=8 * r.input_size,
                    batch_rule=r.batch_rule)
        skip = train_unavailable(v, cfg) or (budget.spent() and ("skipped", f"section budget {budget.seconds}s spent"))
        if skip:
            rows.append(dict(base, status=skip[0], reason=skip[1]))
            continue
        try:
            if r.batch_rule == "common":
                batch = cfg.common_batch[r.input_size]
            else:
                key = (v.preset, v.backend, r.input_size)
                if key not in fitted:
                    fitted[key] = fitted_batch(v, r.input_size, cfg)
                batch = fitted[key]
            if (v.label, r.input_size, batch) not in measured:
                measured[v.label, r.input_size, batch] = run_train_variant(v, batch, r.input_size, cfg, peaks,
                                                                           timer_factory)
            rows.append(dict(measured[v.label, r.input_size, batch], batch_rule=r.batch_rule, status="ok"))
        except Exception as err:  # noqa: BLE001 - reported, the report goes on
            rows.append(dict(base, status="error", reason=f"{type(err).__name__}: {err}"[:300]))
            _release(bool(v.compile))
    baseline = train_baseline(cfg)
    bases = {(r["input_size"], r["batch_rule"]): r for r in rows if r["variant"] == baseline and r["status"] == "ok"}
    for r in rows:
        base = bases.get((r["input_size"], r["batch_rule"]))
        if base and r["status"] == "ok":
            r["vs_baseline"] = r["images_per_s"] / base["images_per_s"]
            r["baseline"] = base["variant"]
    return rows


def run_cpu_figure(cfg, timer_factory=Timer):
    """Item 3: MaskDiT (mask ratio 0.5) vs DiT train-step time on the CPU: same width and depth, pure
    PyTorch, fp32, one thread. The two steps alternate call by call so that load changes on a
    shared CPU hit both alike; each figure is the median of its calls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable across machines, and immune to oversubscribed cores
    try:
        return _cpu_figure(cfg.cpu_figure, timer_factory)
    finally:
        torch.set_num_threads(threads)


def _cpu_figure(fig, timer_factory):
    size, batch = fig["preset"], fig["batch"]
    input_size = fig["overrides"]["input_size"]
    arch = {k: v for k, v in fig["overrides"].items() if k != "input_size"}
    variants = {"maskdit": TrainVariant("maskdit", f"MaskDiT-{size}", arch, "torch", 0.5),
                "dit": TrainVariant("dit", f"DiT-{size}", {k: v for k, v in arch.items() if not k.startswith("decoder_")},
                                    "torch", 0.0)}
    steps, timers, rows = {}, {}, {}
    for label, v in variants.items():
        steps[label], model, _ = build_train_step(v, batch, input_size, "cpu", torch.float32)
        flops = train_step_flops(model, batch=batch, mask_ratio=v.mask_ratio)
        rows[label] = dict(variant=label, model=v.preset, mask_ratio=v.mask_ratio, batch=batch, flops=flops,
                           params_M=sum(p.numel() for p in model.parameters()) / 1e6)
        timers[label] = timer_factory("cpu")
    for _ in range(fig["warmup"]):
        for label in variants:
            steps[label]()
    for _ in range(fig["reps"]):
        for label in variants:
            timers[label](steps[label])
    for label in variants:
        stats = Stats.from_times(timers[label].times_ms())
        rows[label].update(ms=stats.median_ms, p10_ms=stats.p10_ms, p90_ms=stats.p90_ms, n=stats.n)
    m, d = rows["maskdit"], rows["dit"]
    return dict(config=dict(preset=size, batch=batch, threads=torch.get_num_threads(), **fig["overrides"]),
                maskdit_ms=m["ms"], dit_ms=d["ms"], speedup=d["ms"] / m["ms"],
                flops_ratio=d["flops"] / m["flops"],
                rows=[m, d])
