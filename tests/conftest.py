"""Test setup. Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it is decided here without importing torch."""
import glob
import os

HAS_GPU = bool(glob.glob("/dev/nvidia[0-9]*"))
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
