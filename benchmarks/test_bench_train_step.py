"""Training step (EDM MaskDiT loss, backward, AdamW), one test per train-step variant of the report
(maskdit_fast.bench.cases.TRAIN_VARIANTS): MaskDiT reference (the official math in plain PyTorch)
eager and compiled, the fused back-end eager / compiled / with CUDA graphs / fp8, DiT eager and
compiled. GPU: XL/2 at 256 px (4x32x32 latents), bf16 autocast, the largest batch that fits. CPU:
the S-width CPU figure's config in fp32 (the fused, Triton, CUDA-graph and fp8 variants skip).
extra_info: batch, images/s, TFLOP/s and MFU (maskdit_fast.flops over the measured matmul peak),
peak memory (GPU), compile seconds (outside the timed steps)."""
import pytest
import torch

from maskdit_fast import bench
from maskdit_fast.bench.train_step import first_steps, fitted_batch, train_unavailable

_LABELS = [v.label for v in bench.train_variants(bench.make_config("cpu", "cpu"))]


@pytest.mark.parametrize("index", range(len(_LABELS)), ids=_LABELS)
def test_train_step(index, cfg, peaks, timed, benchmark, device):
    variant = bench.train_variants(cfg)[index]
    unavailable = train_unavailable(variant, cfg)
    if unavailable:
        pytest.skip(unavailable[1])
    size = cfg.train_input_sizes[0]
    step, model, batch, first_s, n_first, _ = first_steps(variant, fitted_batch(variant, size, cfg), size, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = timed(step, cfg.train_warmup, cfg.train_reps,
                  figures=lambda ms: bench.train_figures(model, batch, variant.mask_ratio, ms, device, peaks),
                  variant=variant.label, model=variant.preset, backend=variant.backend, mask_ratio=variant.mask_ratio,
                  batch=batch, compile=variant.compile or None, cuda_graphs=variant.cuda_graphs)
    if variant.compile:
        benchmark.extra_info["compile_s"] = max(0.0, first_s - n_first * stats.median_ms / 1e3)
