"""Writes the per-op back-end table that `backend="auto"` reads, from a GPU benchmark report.

    python benchmarks/backend_table.py REPORT.json [--note TEXT] [--out DIR]
        # -> DIR/sm_<major><minor>-backends.json (DIR: kernels/tuned, next to the tuned kernel configurations)

For every op of the report (the "ops" and "attention" sections, forward + backward rows), the back-end among
torch / triton / cuda with the least total ms over the op's shapes (maskdit_fast.backend.backend_table). The
file keeps those totals and the report it came from, so a later report of the same architecture replaces it
with its own measurements.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from maskdit_fast.backend import backend_table  # noqa: E402
from maskdit_fast.kernels._config import TUNED_DIR  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="a benchmark report JSON (written by python -m maskdit_fast.bench on a GPU)")
    parser.add_argument("--note", default=None, help="what the reader should know about the measurement")
    parser.add_argument("--out", default=TUNED_DIR, help="folder of the table (default: kernels/tuned)")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    source = os.path.relpath(os.path.abspath(args.report), ROOT)
    table = backend_table(report, source=source, note=args.note)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{table['arch']}-backends.json")
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"{path}: {table['backends']}")
    return path


if __name__ == "__main__":
    main()
