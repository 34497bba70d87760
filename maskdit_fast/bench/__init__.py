"""One-command benchmark report: `python -m maskdit_fast.bench [--out DIR] [--quick] [--cpu-quick]`.

On a GPU every section has a time budget and reports what it had to skip:
  1. peaks: device copy bandwidth and bf16 matmul peak, measured in this process;
  2. ops / attention: every op x back-end first checked against its reference (outputs and
     gradients, maskdit_fast.accuracy's rule; a back-end that fails is reported, never timed), then
     timed, forward and forward+backward, at DiT-XL/2 shapes (bf16), with achieved GB/s or TFLOP/s, % of the floor and the speed-up over torch eager;
  3. train_step: MaskDiT-XL/2 reference (the official math in plain PyTorch), eager and compiled,
     against the package's fused step (eager, compiled, with CUDA graphs, fp8) and DiT-XL/2 eager and
     compiled, at 256 and 512 px, each at the largest batch that fits and all at one common batch:
     images/s, MFU, peak memory, compile time apart;
  4. profile: where the fused step's time goes (GEMMs, attention, glue ops, elementwise /
     normalisation, optimizer, idle gaps) and the GEMMs' TFLOP/s;
  5. cpu_figure: MaskDiT vs DiT train-step time at mask ratio 0.5 on the CPU (pure PyTorch, small
     config), measured on every run.
Then writes `<out>/<date>-<card>.json` and `.md`. Without a GPU it runs the CPU subset (torch
back-ends at small shapes, the CPU figure) and says so; `--cpu-quick` is a seconds-long CPU run
with tiny shapes (the tests use it).

Modules: config (modes, sizes, budgets), cases (op / attention cases, train-step variants), backends
(what each back-end name runs, capability checks), checks (correctness before timing), timing
(timers, CUDA-graph replay, budgets, peaks), costs (bytes / FLOPs floors), op_section, train_step,
step_profile, report (sections, Markdown / JSON), cli.
"""
from maskdit_fast.bench.backends import GPU_ONLY_BACKENDS, Unavailable, backend_fn
from maskdit_fast.bench.cases import (ATTENTION_BACKENDS, OP_BACKENDS, PASSES, OpCase, TrainVariant, attention_cases,
                                      op_cases, train_baseline, train_rows, train_variants)
from maskdit_fast.bench.checks import check_case
from maskdit_fast.bench.cli import main
from maskdit_fast.bench.config import CPU_TINY, SECTIONS, Config, make_config
from maskdit_fast.bench.op_section import input_sets, pass_call, pass_cost, run_op_section
from maskdit_fast.bench.report import SCHEMA, env_info, run_peaks, run_report, to_markdown, write_report
from maskdit_fast.bench.step_profile import run_profile
from maskdit_fast.bench.timing import Budget, Rotation, Stats, Timer, time_calls
from maskdit_fast.bench.train_step import build_train_step, fit_batch, run_train_section, train_figures

__all__ = [
    "ATTENTION_BACKENDS", "Budget", "CPU_TINY", "Config", "GPU_ONLY_BACKENDS", "OP_BACKENDS",
    "OpCase", "PASSES", "Rotation", "SCHEMA", "SECTIONS", "Stats", "Timer", "TrainVariant", "Unavailable",
    "attention_cases", "backend_fn", "build_train_step", "check_case", "env_info", "fit_batch", "input_sets",
    "main", "make_config", "op_cases", "pass_call", "pass_cost",
    "run_op_section", "run_peaks", "run_profile", "run_report", "run_train_section", "time_calls", "to_markdown",
    "train_baseline", "train_figures", "train_rows", "train_variants", "write_report",
]
