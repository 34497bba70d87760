"""Training step (EDM MaskDiT loss, backward, AdamW): MaskDiT with the fused back-end vs MaskDiT in
pure PyTorch (the official implementation's math) vs DiT of the same size. GPU: XL/2 at 256 px
(4x32x32 latents), bf16 autocast, the largest batch that fits. CPU: the S-width CPU figure's config
in fp32 (the fused variant skips). extra_info: batch, images/s, TFLOP/s and MFU (maskdit_fast.flops
over the measured matmul peak), peak memory (GPU)."""
import pytest
import torch

from maskdit_fast import bench

_LABELS = [v[0] for v in bench.train_variants(bench.make_config("cpu", "cpu"))]


@pytest.mark.parametrize("index", range(len(_LABELS)), ids=_LABELS)
def test_train_step(index, cfg, peaks, timed, device):
    label, preset, overrides, backend, ratio = bench.train_variants(cfg)[index]
    reason = bench.train_variant_skip(backend, device)
    if reason:
        pytest.skip(reason)
    step, model, batch = bench.prepare_train_variant(preset, overrides, backend, ratio, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed(step, cfg.train_warmup, cfg.train_reps,
          figures=lambda ms: bench.train_figures(model, batch, ratio, ms, device, peaks),
          variant=label, model=preset, backend=backend, mask_ratio=ratio, batch=batch)
