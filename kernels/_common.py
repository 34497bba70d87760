"""Launcher helpers shared by the Triton op families (gather/scatter, modulate).

Every buffer a launcher hands back (outputs, gradients, partial-sum buffers) comes from `empty()`,
so tests can poison them with NaN (`poisoned()`) and prove that the kernels write every element.
"""
import contextlib

import torch
import triton
import triton.language as tl

_poison = False

# Reductions are split into chunks, each summed by one program into a row of an fp32 partial-sum
# buffer that torch then sums: aim for TARGET_PROGRAMS programs in all, with at most MAX_CHUNKS
# chunks so the buffers stay small next to the reduced tensor. Constants (not the SM count), so the
# split, and hence the rounding of the deterministic reductions, depends on the shapes only.
TARGET_PROGRAMS = 2048
MAX_CHUNKS = 32


@contextlib.contextmanager
def poisoned():
    """Test hook: launchers fill every buffer they allocate with NaN instead of leaving it empty."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty(shape, dtype, device):
    """torch.empty, or NaN-filled inside `poisoned()`."""
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def acc_dtype(*dtypes):
    """Triton accumulation dtype: float64 when any operand is float64, float32 otherwise."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def torch_acc_dtype(*dtypes):
    """torch dtype of partial-sum buffers written by kernels accumulating in acc_dtype(*dtypes)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def block_d(d, cap):
    """Columns per program: D rounded up to a power of two, at most `cap` (>= 16 for tl.arange)."""
    return max(16, min(triton.next_power_of_2(max(d, 1)), cap))


# Elements per program tile: a [rows, BLOCK_D] tile holds about this many (rows = TILE // BLOCK_D), so
# narrow rows are batched and wide rows (D = 1152 -> 2048 columns) take 2 rows per program.
TILE = 4096


def rows_per_tile(block):
    """Rows of a [rows, block] tile (a power of two since block is)."""
    return max(1, TILE // block)


def num_warps(elements):
    """4 warps up to 2048 tile elements, 8 above (<= 16 values per thread per operand at TILE)."""
    return 4 if elements <= 2048 else 8


def split(total, other_programs):
    """Splits a reduction over `total` items into chunks: returns (items_per_chunk, n_chunks) with
    other_programs * n_chunks about TARGET_PROGRAMS and n_chunks <= MAX_CHUNKS."""
    want = max(1, min(total, MAX_CHUNKS, triton.cdiv(TARGET_PROGRAMS, max(other_programs, 1))))
    per = max(1, triton.cdiv(total, want))
    return per, triton.cdiv(total, per)


def require_contiguous(t, name):
    """Low-level launchers index with packed row-major offsets."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got shape {tuple(t.shape)}, strides {t.stride()})")
