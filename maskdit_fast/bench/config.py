"""What one report run measures: shapes, repetitions, train-step sizes and section time budgets,
per mode ("gpu", "gpu-quick", "cpu", "cpu-quick")."""
import dataclasses

import torch

SECTIONS = ("peaks", "ops", "attention", "train_step", "profile", "cpu_figure")
MODES = ("gpu", "gpu-quick", "cpu", "cpu-quick")


@dataclasses.dataclass
class Config:
    """Sizes, repetitions and per-section time budgets (seconds) of one report run."""
    mode: str
    device: str
    dtype: torch.dtype
    # op shapes: batch, tokens, kept tokens, encoder width / heads, decoder width / heads
    B: int
    L: int
    K: int
    D: int
    H: int
    Dd: int
    Hd: int
    warmup: int
    reps: int
    compile: bool                 # include the torch.compile rows (ops and train steps)
    copy_bytes: int
    matmul_n: int
    train_size: str               # preset size of the train-step variants, e.g. "XL/2"
    train_overrides: dict         # architecture overrides (depth, widths, num_classes) for them
    train_input_sizes: tuple      # latent sizes of the train-step rows (32: 256 px, 64: 512 px)
    train_batches: tuple          # batch rules of the rows: "fit" (largest that fits) and / or "common"
    common_batch: dict            # latent size -> the batch every row runs at under "common"
    train_warmup: int
    train_reps: int
    max_batch: int
    fixed_batch: int              # "fit" where no CUDA memory probe exists (CPU)
    compile_backend: str          # torch.compile backend of the compile rows ("aot_eager" needs no compiler)
    profile: dict                 # input_size, batch, warmup, steps of the profiled fused step
    cpu_figure: dict              # preset, overrides, batch, warm-up and repetitions of the CPU figure
    budgets: dict
    sections: tuple               # sections run by default


XL = dict(B=128, L=256, K=128, D=1152, H=16, Dd=512, Hd=16)
CPU_SMALL = dict(B=8, L=64, K=32, D=128, H=4, Dd=64, Hd=4)
CPU_TINY = dict(B=2, L=16, K=8, D=32, H=2, Dd=32, Hd=2)  # head dims 16: the Triton minimum
# Item 3 of the benchmark issue: S width (384, 6 heads) at 32x32 latents, patch 2 (256 tokens),
# depth 4 with a 1-block decoder (160 wide: 4.3 % of the encoder's cost per token, the S/2 preset's
# 5.8 %), batch 4: ~45 GFLOP per DiT step, about a second on two cores.
CPU_FIGURE = dict(preset="S/2", overrides=dict(input_size=32, depth=4, decoder_depth=1, num_classes=10),
                  batch=4, warmup=1, reps=5)
CPU_FIGURE_TINY = dict(preset="S/2", overrides=dict(input_size=16, depth=2, decoder_depth=1, hidden_size=64,
                                                    num_heads=2, decoder_hidden_size=32, decoder_num_heads=2,
                                                    num_classes=10), batch=4, warmup=1, reps=3)
# The paper's per-GPU batch (128 at 256 px) and, at 512 px, the same tokens per step.
GPU_COMMON_BATCH = {32: 128, 64: 32}


def _architecture(overrides):
    return {k: v for k, v in overrides.items() if k != "input_size"}


def make_config(mode, device):
    """Config for mode "gpu" | "gpu-quick" | "cpu" | "cpu-quick" on `device`."""
    device = str(device)
    if mode in ("gpu", "gpu-quick"):
        quick = mode == "gpu-quick"
        return Config(mode, device, torch.bfloat16, **XL, warmup=5 if quick else 10, reps=20 if quick else 50,
                      compile=not quick, copy_bytes=1 << 30, matmul_n=8192, train_size="XL/2", train_overrides={},
                      train_input_sizes=(32, 64), train_batches=("fit", "common"), common_batch=GPU_COMMON_BATCH,
                      train_warmup=2 if quick else 3, train_reps=4 if quick else 10, max_batch=512, fixed_batch=0,
                      compile_backend="inductor", profile=dict(input_size=32, batch=128, warmup=2, steps=3),
                      cpu_figure=CPU_FIGURE,
                      budgets=dict(peaks=15, ops=70 if quick else 90, attention=30 if quick else 40,
                                   train_step=120 if quick else 210, profile=30, cpu_figure=30),
                      sections=SECTIONS)
    if mode == "cpu":
        # The train-step section would repeat the CPU figure (same models): not run by default.
        fig = CPU_FIGURE
        return Config(mode, device, torch.float32, **CPU_SMALL, warmup=3, reps=30, compile=True,
                      copy_bytes=64 << 20, matmul_n=512, train_size=fig["preset"],
                      train_overrides=_architecture(fig["overrides"]),
                      train_input_sizes=(fig["overrides"]["input_size"],), train_batches=("fit",), common_batch={},
                      train_warmup=1, train_reps=3, max_batch=fig["batch"], fixed_batch=fig["batch"],
                      compile_backend="inductor",
                      profile=dict(input_size=fig["overrides"]["input_size"], batch=fig["batch"], warmup=1, steps=2),
                      cpu_figure=fig,
                      budgets=dict(peaks=20, ops=120, attention=30, train_step=300, profile=60,
                                   cpu_figure=90),
                      sections=tuple(s for s in SECTIONS if s != "train_step"))
    if mode == "cpu-quick":
        fig = CPU_FIGURE_TINY
        return Config(mode, device, torch.float32, **CPU_TINY, warmup=1, reps=3, compile=False,
                      copy_bytes=1 << 20, matmul_n=64, train_size=fig["preset"],
                      train_overrides=_architecture(fig["overrides"]),
                      train_input_sizes=(fig["overrides"]["input_size"],), train_batches=("fit",), common_batch={},
                      train_warmup=1, train_reps=2, max_batch=4, fixed_batch=4, compile_backend="aot_eager",
                      profile=dict(input_size=fig["overrides"]["input_size"], batch=2, warmup=1, steps=2),
                      cpu_figure=fig,
                      budgets=dict(peaks=10, ops=20, attention=20, train_step=30, profile=20,
                                   cpu_figure=30),
                      sections=SECTIONS)
    raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
