"""Training configuration: a flat dataclass, named presets, a JSON/TOML config file, CLI overrides.

Precedence (later wins): dataclass defaults < preset (`--preset`, default "mnist") < config file
(`--config run.toml` / `run.json`, keys = field names) < command-line flags (`--lr 2e-3`,
`--no-ema-warmup`, `--model-kwargs '{"depth": 6}'`).
"""
import argparse
import dataclasses
import inspect
import io
import json
import math
import numbers
import os
import tokenize
import typing
from dataclasses import dataclass, field
from typing import List

from maskdit_fast.backend import BACKENDS
from maskdit_fast.parallel import COMPILE_SCOPES

PRECISIONS = ("fp32", "bf16", "fp8")
COMPILE_MODES = ("default", "max-autotune")


@dataclass
class TrainConfig:
    """Every knob of `python -m maskdit_fast.train` (see `PRESETS` for the shipped recipes)."""
    name: str = "mnist"                 # run name; the run dir defaults to runs/<name>
    run_dir: str = ""                   # output directory (checkpoints, logs, grids)
    # data
    data: str = "mnist5k"               # "mnist5k" | "mnist5k-24" | "digits" | directory of latent shards
    num_classes: int = 10               # label classes (CFG's null class comes on top)
    # model: maskdit_fast.models.create_model(model, input_size=, in_channels=, num_classes=, **model_kwargs)
    model: str = "MaskDiT-S/2"          # preset: DiT-* or MaskDiT-* (e.g. MaskDiT-XL/2)
    model_kwargs: dict = field(default_factory=dict)  # JSON overrides of the preset's architecture
    # EDM loss
    P_mean: float = -1.2                # EDM: mean of log sigma of the training noise
    P_std: float = 1.2                  # EDM: std of log sigma
    sigma_data: float = 0.5             # EDM: data standard deviation
    mae_coef: float = 0.1               # weight of the MAE loss on masked patches
    mask_ratio: float = 0.5             # pre-training ratio; 0 = plain DiT / unmasked fine-tuning
    mask_schedule: str = "constant"     # constant | linear | cosine (mask_ratio -> mask_ratio_end)
    mask_ratio_end: float = 0.0         # final ratio of the linear / cosine schedule
    unmasked_steps: int = 0             # final steps trained at ratio 0 (train/test mismatch fix)
    # per-sample mask ratios ~ U[low, high) during the masked phase, replacing mask_ratio (MaskDiT's
    # packed encoder); [] = off
    mask_ratio_range: List[float] = field(default_factory=list)  # LOW HIGH (see above); empty = off
    # each global micro-batch split round-robin into groups at these image sizes (average-pooled
    # pixel data; MaskDiT, one packed encoder pass over all groups); [] = the data's own size only
    mixed_resolutions: List[int] = field(default_factory=list)  # sizes of the groups (see above); empty = off
    label_dropout: float = 0.1          # fraction of labels replaced by the null class (CFG)
    # optimisation
    steps: int = 1000                   # total optimizer steps
    batch_size: int = 128               # global batch per optimizer step
    grad_accum: int = 1                 # micro-batches per step (batch_size % grad_accum == 0)
    lr: float = 1e-4                    # peak AdamW learning rate
    lr_warmup_steps: int = 0            # linear warm-up, then constant
    lr_decay_steps: int = 0             # final steps with linear decay to 0 (0 = constant lr)
    weight_decay: float = 0.0           # AdamW weight decay
    adam_beta2: float = 0.999           # AdamW beta2
    grad_clip: float = 0.0              # max grad norm (0 = off)
    ema_decay: float = 0.9999           # EMA decay of the sampled / exported weights
    ema_warmup: bool = True             # decay = min(ema_decay, (1 + step) / (10 + step))
    ema_restart: bool = False           # the EMA starts over (= the weights) at the first unmasked step
    seed: int = 0                       # seeds the init, data order, masks and noise
    precision: str = "fp32"             # fp32 | bf16 (autocast) | fp8 (float8 block linears + bf16; maskdit_fast.fp8)
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    ops_backend: str = "auto"           # auto (MASKDIT_FAST_BACKEND, else the fastest) | torch | triton | cuda
    threads: int = 0                    # torch CPU threads (0 = leave torch's default)
    max_nan_skips: int = 0              # non-finite losses tolerated (step skipped) before stopping
    # scale-out (launch with torchrun; see maskdit_fast.parallel)
    parallel: str = "none"              # none | ddp | fsdp (FSDP2: fully_shard per block, then the root)
    reshard_after_forward: bool = True  # fsdp: free gathered block weights after forward (ZeRO-3)
    compile: bool = False               # torch.compile the network (compile_scope, compile_mode, cuda_graphs say how)
    compile_scope: str = "blocks"       # blocks (each block: dynamic token counts, FSDP) | model (whole forward)
    compile_mode: str = "default"       # default | max-autotune (autotuned GEMM templates; long compile)
    cuda_graphs: bool = False           # compiled forward/backward replayed as CUDA graphs (static shapes, one GPU)
    compile_backend: str = "inductor"   # torch.compile backend (aot_eager needs no C++ compiler)
    activation_checkpointing: str = "none"  # none | full | selective (keep matmul/attention outputs)
    async_checkpoint: bool = False      # sharded (DCP) checkpoints written in a background thread
    peak_tflops: float = 0.0            # per-device peak for MFU; 0 = known GPUs' bf16 / TF32 peak
    # run control
    resume: str = "auto"                # auto (newest verified in run dir) | never | path to a checkpoint
    restart: bool = False               # start over: move a previous run's outputs in the run dir aside
    init_from: str = ""                 # start a new stage from a checkpoint's weights (e.g. fine-tuning)
    log_every: int = 50                 # steps between metrics lines
    ckpt_every: int = 500               # steps between checkpoints
    keep_last: int = 3                  # checkpoints kept
    sample_every: int = 0               # sample grid every N steps (0 = only at the end)
    # sampling (grids and the final evaluation)
    sample_steps: int = 18              # sampler steps (grids, final evaluation)
    sample_cfg: float = 1.5             # classifier-free guidance scale when sampling
    sample_cfg_interval: List[float] = field(default_factory=list)  # LO HI: guide only at LO < sigma <= HI; [] = all
    sample_solver: str = "heun"         # heun | euler
    sample_per_class: int = 10          # grid rows per class at the end; also the eval sample count
    eval_per_class: int = 50            # samples per class scored by the digit classifier (MNIST-5k data)

    def validate(self):
        """Raises ValueError on inconsistent settings; returns self."""
        for f in dataclasses.fields(self):  # NaN passes every comparison below; inf is never meant
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config: {f.name} must be a finite number, got {value}")
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.batch_size % self.grad_accum == 0, f"batch_size {self.batch_size} is not divisible by "
                                                     f"grad_accum {self.grad_accum}"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.mask_ratio < 1 and 0 <= self.mask_ratio_end < 1, "mask ratios must be in [0, 1)"),
            (0 <= self.unmasked_steps <= self.steps, "unmasked_steps must be in [0, steps]"),
            (0 <= self.label_dropout < 1, "label_dropout must be in [0, 1)"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.sample_solver in ("heun", "euler"), "sample_solver must be heun or euler"),
            (not self.sample_cfg_interval or (len(self.sample_cfg_interval) == 2
                                              and 0 <= self.sample_cfg_interval[0] < self.sample_cfg_interval[1]),
             f"sample_cfg_interval must be [] or [lo, hi] with 0 <= lo < hi, got {self.sample_cfg_interval!r}"),
            (self.mask_schedule in ("constant", "linear", "cosine"),
             f"mask_schedule must be constant, linear or cosine, got {self.mask_schedule!r}"),
            (self.keep_last >= 1 and self.ckpt_every >= 1 and self.log_every >= 1,
             "keep_last, ckpt_every and log_every must be >= 1"),
            (self.lr_warmup_steps >= 0 and self.lr_decay_steps >= 0 and self.max_nan_skips >= 0,
             "lr_warmup_steps, lr_decay_steps and max_nan_skips must be >= 0"),
            (self.num_classes >= 1, "num_classes must be >= 1"),
            (self.parallel in ("none", "ddp", "fsdp"), f"parallel must be none, ddp or fsdp, got {self.parallel!r}"),
            (self.ops_backend in ("auto",) + BACKENDS,
             f"ops_backend must be one of {('auto',) + BACKENDS}, got {self.ops_backend!r}"),
            (self.activation_checkpointing in ("none", "full", "selective"),
             f"activation_checkpointing must be none, full or selective, got {self.activation_checkpointing!r}"),
            (self.peak_tflops >= 0, "peak_tflops must be >= 0"),
            (self.sample_steps >= 1 and self.sample_cfg >= 0, "sample_steps must be >= 1 and sample_cfg >= 0"),
            (min(self.sample_every, self.sample_per_class, self.eval_per_class, self.grad_clip) >= 0,
             "sample_every, sample_per_class, eval_per_class and grad_clip must be >= 0"),
            (not (self.restart and self.resume not in ("auto", "never")),
             f"restart starts over; it cannot resume {self.resume!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"config: {message}")
        self._validate_lists()
        self._validate_compile()
        return self

    def _validate_compile(self):
        """compile_scope / compile_mode / cuda_graphs / fp8: what each needs of the rest of the config
        (the device checks of fp8 are in maskdit_fast.fp8, run by the trainer before anything is written)."""
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"config: compile_scope must be one of {COMPILE_SCOPES}, got {self.compile_scope!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"config: compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.precision == "fp8" and not self.compile:
            raise ValueError("config: precision fp8 needs compile (--compile): torchao's float8 casts run as separate "
                             "kernels in eager mode, slower than bf16; compiled they fuse into the neighbouring ops")
        if not self.compile:
            return
        static = self.compile_scope == "model" or self.cuda_graphs
        varying = [name for name, on in (("mask_schedule " + self.mask_schedule, self.mask_schedule != "constant"),
                                         ("mask_ratio_range", bool(self.mask_ratio_range)),
                                         ("mixed_resolutions", bool(self.mixed_resolutions))) if on]
        if static and varying:
            what = "cuda_graphs" if self.cuda_graphs else "compile_scope model"
            raise ValueError(f"config: {what} needs static shapes (one kept-token count per phase), but "
                             f"{', '.join(varying)} changes them step to step (a recompile or CUDA-graph capture per "
                             f"count); use compile_scope blocks without cuda_graphs (dynamic token counts)")
        if self.compile_scope == "model" and self.parallel == "fsdp":
            raise ValueError("config: compile_scope model with parallel fsdp: FSDP2 gathers weights per block, "
                             "so compile per block (compile_scope blocks), as torchtitan does")
        if self.cuda_graphs and self.parallel != "none":
            raise ValueError(f"config: cuda_graphs needs parallel none (one process), got {self.parallel!r}: FSDP2 "
                             f"re-allocates the gathered weights every step and DDP's gradient hooks run outside the "
                             f"captured graphs (not verified here); use compile without cuda_graphs")

    def torch_compile_mode(self):
        """The torch.compile `mode` of compile_mode + cuda_graphs (inductor's CUDA graphs are a mode)."""
        return {("default", False): "default", ("default", True): "reduce-overhead",
                ("max-autotune", False): "max-autotune-no-cudagraphs",
                ("max-autotune", True): "max-autotune"}[self.compile_mode, self.cuda_graphs]

    def _validate_lists(self):
        """mask_ratio_range and mixed_resolutions (the data-dependent checks of mixed_resolutions
        are in maskdit_fast.train.group_shapes)."""
        r = self.mask_ratio_range
        if r:
            if len(r) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in r):
                raise ValueError(f"config: mask_ratio_range must be two numbers [low, high], got {r!r}")
            if not all(0 <= v < 1 for v in r):
                raise ValueError(f"config: mask_ratio_range values must be in [0, 1), got {r!r}")
            if r[0] > r[1]:
                raise ValueError(f"config: mask_ratio_range needs low <= high, got {r!r}")
            if self.mask_schedule != "constant":
                raise ValueError(f"config: mask_ratio_range replaces the mask ratio schedule; it needs "
                                 f"mask_schedule constant, got {self.mask_schedule!r}")
        sizes = self.mixed_resolutions
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
            raise ValueError(f"config: mixed_resolutions must be positive ints (image sizes), got {sizes!r}")
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"config: mixed_resolutions has duplicates: {sizes!r}")

    def to_dict(self):
        return dataclasses.asdict(self)


# How the GPU presets compile once `--compile` is given (one flag). Off by default until measured:
# the GPU session's train-step table (`python -m maskdit_fast.bench --sections train_step`, rows
# "fused + compile" per block / whole model / + CUDA graphs, MaskDiT-XL/2 at ratio 0.5, and the
# same at 512 px) decides both these values and whether `compile` itself becomes True here. Per
# block is the choice that also runs under DDP and FSDP2; compile_scope "model" refuses FSDP2 and
# cuda_graphs refuses more than one process (TrainConfig._validate_compile).
GPU_COMPILE = dict(compile=False, compile_scope="blocks", compile_mode="default", cuda_graphs=False)

PRESETS = {
    # The laptop default: ~4-6 min on 2 idle CPU cores, pixel-space MNIST-5k digits (centre 24 x 24).
    "mnist": dict(
        name="mnist", data="mnist5k-24", model="MaskDiT-S/4",
        # Decoder 1 x 48: 9% of a masked step's FLOPs (maskdit_fast.flops), so a masked step costs ~0.5x
        # an unmasked one as in the paper (a 2 x 64 decoder was 22%); it takes 14-17% less CPU time per
        # step than 2 x 64 here, with the same sample accuracy. MLP ratio 2 (1.09M parameters): 1.36x the
        # steps per second of ratio 4, and at equal time 97.5% / speckle 0.62 against 95.5% / 0.67.
        model_kwargs=dict(hidden_size=128, depth=4, num_heads=4, mlp_ratio=2.0, decoder_hidden_size=48,
                          decoder_depth=1, decoder_num_heads=4),
        # Noise levels centred far above EDM's -1.2 / 1.2: in a short run the global shape and the
        # class (learnt at large sigma) matter more than fine detail. Sample class accuracy at equal
        # compute: P_mean -1.2 / 1.2: 20% (CFG 2); -0.6 / 1.4: 46% (CFG 2), 66% (CFG 4); -0.2 / 1.4: 82.5%
        # (81.5% with the batch-64 recipe); higher is worse: 0.2 / 1.4: 81.5%, 0.5 / 1.2: 75%, 0.7 / 1.4: 40%.
        P_mean=-0.2, P_std=1.4,
        # MAE weight 0.1 (the paper's): with 0 the samples scored 57%, with 0.5 they kept a grey noise
        # background the classifier rejects (10%); 0.1 gave 81.5% (batch 64). An inpainting target (the DSM
        # term on the masked patches instead of the normalised noisy patch) scored 75% (0.1) and 61% (0.5).
        # Mask ratio 0.75 instead of 0.5 for 5,180 steps instead of 4,600 (32 x 32, Euler 24 + interval): 92.5%
        # and speckle 0.92 against 99.5% and 0.22.
        mae_coef=0.1,
        # Batch 32 (batch 64 at equal time scored 80% against 88%). Speckle (classifier.stray_components) falls with
        # the images trained on, not the steps: batch 16 for twice the steps left it at 1.2-1.3 (1.35 at batch 32),
        # twice the batch-32 steps brought it to 0.49. Hence the 24 x 24 crop: 36 tokens instead of 64 (most of them
        # blank margin) make a step ~0.6-0.67x as long (full runs, one or two threads), so 6,000 steps (100%, speckle
        # 0.15) take ~0.8x the time of 4,600 at 32 x 32 (99%, 0.43). The last 700 steps are unmasked with the EMA
        # started over there, so the sampled weights never saw masking; lr decays over them only (over the last 2,000
        # / 3,500 steps: 98% but speckle 0.86 / 0.92; 400 unmasked steps: the same as 700). AdamW beta2 0.99 (0.999: 3
        # points lower), lr 2e-3 (3e-3 was unstable). At equal time the same network trained unmasked throughout (850
        # batch-64 steps) scored 36%, at mask ratio 0.25 67%, 0.75 84% (all batch 64, against 80% at 0.5).
        steps=6000, batch_size=32, lr=2e-3, adam_beta2=0.99, lr_warmup_steps=100, lr_decay_steps=700,
        ema_decay=0.995, mask_ratio=0.5, unmasked_steps=700, ema_restart=True, log_every=50, ckpt_every=1000,
        # Euler, 24 steps, CFG 4 only above sigma 1 (guidance interval): on the same weights the speckle halves
        # against Heun 12 steps with CFG at every level (0.42 -> 0.22; the stroke texture, mean |Laplacian|,
        # 0.363 -> 0.306; real digits 0.264) at equal accuracy, with 38 network evaluations instead of 46. Heun
        # with the interval 0.305, Euler without it 0.29; no clear gain from CFG 3 / 6, rho 5, 36 steps or a
        # higher sigma_min; EDM's churn was worse.
        sample_solver="euler", sample_steps=24, sample_cfg=4.0, sample_cfg_interval=[1.0, 80.0],
        sample_per_class=10, eval_per_class=20,
        # Two threads, one per core of the 2-core machine this run is sized for: 1.3-1.5x the steps per
        # second of one thread (short benchmarks; 1.6x for MLP ratio 4 at 32 x 32 on an Intel machine). OpenMP
        # threads spin while they wait, so when another process keeps a core busy two threads run ~2x slower
        # than one: pass --threads 1 then.
        threads=2),
    # sklearn's 8x8 digits with a very small model: seconds per run, for tests and smoke checks.
    "digits-tiny": dict(
        name="digits-tiny", data="digits", model="MaskDiT-S/2",
        model_kwargs=dict(hidden_size=32, depth=1, num_heads=2, decoder_hidden_size=32, decoder_depth=1,
                          decoder_num_heads=2),
        steps=20, batch_size=16, lr=1e-3, ema_decay=0.99, log_every=5, ckpt_every=10,
        sample_steps=2, sample_per_class=1, eval_per_class=0),
    # The paper's ImageNet-256 pre-training (8 GPUs x 128 = 1024 in the paper; set batch_size to fit).
    "imagenet-xl2": dict(
        name="imagenet-xl2", model="MaskDiT-XL/2", num_classes=1000, data="",
        steps=2_000_000, batch_size=1024, lr=1e-4, ema_decay=0.9999, ema_warmup=False, mask_ratio=0.5,
        mae_coef=0.1, precision="bf16", log_every=100, ckpt_every=10_000, sample_every=50_000,
        sample_steps=40, sample_cfg=1.5, sample_per_class=0, eval_per_class=0, **GPU_COMPILE),
    # Unmasked fine-tuning stage: pass --init-from <pre-training checkpoint>.
    "imagenet-xl2-finetune": dict(
        name="imagenet-xl2-finetune", model="MaskDiT-XL/2", num_classes=1000, data="",
        steps=100_000, batch_size=1024, lr=5e-5, ema_decay=0.9999, ema_warmup=False, mask_ratio=0.0,
        mae_coef=0.0, precision="fp32", log_every=100, ckpt_every=10_000, sample_every=50_000,
        sample_steps=40, sample_cfg=1.5, sample_per_class=0, eval_per_class=0, **GPU_COMPILE),
}


def _field_types():
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _list_item(typ):
    """The element type of a List[T] field, else None."""
    return typing.get_args(typ)[0] if typing.get_origin(typ) is list else None


def config_from_dict(values, base=None, source="config"):
    """Returns a new TrainConfig: `base` (default: dataclass defaults) updated with `values`,
    type-checked; unknown keys raise ValueError naming `source`."""
    types = _field_types()
    current = dataclasses.asdict(base) if base is not None else {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in types:
            raise ValueError(f"{source}: unknown config key {key!r}")
        value = _coerce(value, types[key], f"{source}: {key}")
        # dicts (model_kwargs) merge key by key, so one override keeps the preset's other keys
        current[key] = {**current.get(key, {}), **value} if types[key] is dict else value
    return TrainConfig(**current)


def _coerce(value, typ, what):
    item = _list_item(typ)
    if item is not None:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{what} must be a list of {item.__name__}, got {value!r}")
        return [_coerce(v, item, f"{what}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{what} must be true/false, got {value!r}")
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{what} must be a table/object, got {value!r}")
        return value
    if not isinstance(value, typ) or isinstance(value, bool):
        raise TypeError(f"{what} must be {typ.__name__}, got {value!r}")
    return value


def load_config_file(path):
    """Reads a .toml (tomllib) or .json config file into a dict; ValueError naming the file when it
    does not parse or does not hold a table / object of config keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    if not path.endswith((".toml", ".json")):
        raise ValueError(f"config file {path!r}: expected a .toml or .json file")
    import tomllib  # Python >= 3.11
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f) if path.endswith(".toml") else json.loads(f.read().decode("utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path!r} is not valid {path[-4:].upper()}: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a table / object of config keys, got a "
                         f"{type(values).__name__}")
    return values


def _field_help():
    """{field: its trailing comment in TrainConfig's source}: the --help text of each flag."""
    helps, line_field = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(TrainConfig)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_field:
            line_field[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            helps[line_field[tok.start[0]]] = tok.string.lstrip("#").strip().replace("%", "%%")  # argparse
    return helps


_NARGS = {"mask_ratio_range": 2, "sample_cfg_interval": 2}  # list flags with a fixed count (others take one or more values)


def build_parser():
    """argparse parser: --preset, --config, and one flag per TrainConfig field (default None =
    not given, so presets/config files are only overridden by flags actually passed)."""
    parser = argparse.ArgumentParser(prog="python -m maskdit_fast.train",
                                     description="Train MaskDiT / DiT with the EDM loss.")
    parser.add_argument("--preset", default="mnist", choices=sorted(PRESETS), help="base recipe")
    parser.add_argument("--config", default=None, help="TOML or JSON file of config keys")
    helps = _field_help()
    for name, typ in _field_types().items():
        flag = "--" + name.replace("_", "-")
        text = helps.get(name)
        if typ is bool:
            parser.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=text)
        elif typ is dict:
            parser.add_argument(flag, default=None, type=json.loads, metavar="JSON", help=text)
        elif _list_item(typ) is not None:
            parser.add_argument(flag, default=None, type=_list_item(typ), nargs=_NARGS.get(name, "+"), help=text)
        else:
            parser.add_argument(flag, default=None, type=typ, help=text)
    return parser


def parse_config(argv=None):
    """argv (list of str; None = sys.argv[1:]) -> validated TrainConfig."""
    args = vars(build_parser().parse_args(argv))
    cfg = config_from_dict(PRESETS[args.pop("preset")], source="preset")
    config_path = args.pop("config")
    if config_path:
        cfg = config_from_dict(load_config_file(config_path), base=cfg, source=config_path)
    cfg = config_from_dict({k: v for k, v in args.items() if v is not None}, base=cfg, source="command line")
    if not cfg.run_dir:
        cfg.run_dir = os.path.join("runs", cfg.name)
    return cfg.validate()
