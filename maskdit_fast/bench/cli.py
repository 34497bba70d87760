"""`python -m maskdit_fast.bench [--out DIR] [--quick] [--cpu-quick] [--device D] [--sections S,...]
[--budget SECTION=SECONDS ...]`."""
import argparse
import os
import sys

import torch

from maskdit_fast.bench.config import SECTIONS, make_config
from maskdit_fast.bench.report import run_report, to_markdown, write_report


def _budget(text):
    name, _, seconds = text.partition("=")
    if name not in SECTIONS or not seconds:
        raise argparse.ArgumentTypeError(f"expected SECTION=SECONDS with SECTION one of {', '.join(SECTIONS)}")
    try:
        return name, float(seconds)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{seconds!r} is not a number of seconds") from err


def main(argv=None):
    """CLI entry point; returns 0, or 1 when a check or a section failed (the report is written either way)."""
    parser = argparse.ArgumentParser(prog="python -m maskdit_fast.bench",
                                     description="One-command benchmark report (see maskdit_fast.bench).")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="directory for the results")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, no torch.compile")
    parser.add_argument("--cpu-quick", action="store_true", help="seconds-long CPU run with tiny shapes (tests)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--budget", type=_budget, action="append", default=[], metavar="SECTION=SECONDS",
                        help="a section's time budget instead of the mode's (repeatable)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.cpu_quick else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA device is available")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events, streams and graph capture follow the current device
    if args.cpu_quick and device.type != "cpu":
        parser.error("--cpu-quick runs on the CPU only")
    if device.type == "cuda":
        mode = "gpu-quick" if args.quick else "gpu"
    else:
        mode = "cpu-quick" if args.cpu_quick or args.quick else "cpu"
        print("[bench] no CUDA device: running the CPU subset (torch back-ends, small shapes, CPU figure)")
    cfg = make_config(mode, device)
    report = run_report(cfg, args.sections.split(",") if args.sections else None, budgets=dict(args.budget))
    paths = write_report(report, args.out)
    print(to_markdown(report))
    print(f"[bench] wrote {paths[0]} and {paths[1]}")
    failed = [c["name"] for c in report["checks"] if c.get("status") in ("FAILED", "error")]
    failed += [f"section {k}" for k, v in report["sections"].items() if "error" in v]
    if failed:
        print(f"[bench] FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
