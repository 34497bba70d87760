"""Launch helpers shared by the Triton kernel families: the kernel launch itself, buffer allocation, block
sizes, and the in-kernel reduction of partial sums.

Every buffer a launcher hands back (outputs, gradients, partial-sum buffers) comes from `empty()`, so tests can
poison them with NaN (`poisoned()`) and prove that the kernels write every element.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction

from maskdit_fast.kernels._config import shape_key

_poison = False

# Reductions are split into chunks, each summed by one program into a partial sum that the last program of the
# reduction adds up in chunk order (`last_to_arrive`, `sum_parts`): aim for TARGET_PROGRAMS programs in all, with
# at most MAX_CHUNKS chunks per reduction. Constants (not the SM count), so the split, and hence the rounding of
# the deterministic reductions, depends on the shapes only.
TARGET_PROGRAMS = 2048
MAX_CHUNKS = 32


@contextlib.contextmanager
def poisoned():
    """Test hook: launchers fill every buffer they allocate with garbage instead of leaving it empty."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def empty(shape, dtype, device):
    """torch.empty, or filled inside `poisoned()`: NaN (floats), the most negative value (integers)."""
    if _poison:
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(t, dtype=None):
    """An uninitialised contiguous tensor of t's shape, of `dtype` or t's; filled as `empty` fills inside
    `poisoned()`. torch.empty_like skips the shape and device parsing of torch.empty: about half its host time."""
    if _poison:
        return empty(t.shape, dtype or t.dtype, t.device)
    return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def counters(n, device):
    """n zeroed int32 arrival counters of `last_to_arrive` (one per reduced output tile)."""
    return torch.zeros(max(n, 1), dtype=torch.int32, device=device)


def cdiv(a, b):
    """ceil(a / b) of Python ints (triton.cdiv and next_power_of_2 cost microseconds per call on the host)."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def acc_dtype(*dtypes):
    """Triton accumulation dtype: float64 when any operand is float64, float32 otherwise."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def torch_acc_dtype(*dtypes):
    """torch dtype of partial-sum buffers written by kernels accumulating in acc_dtype(*dtypes)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def block_d(d, cap):
    """Columns per program: D rounded up to a power of two, at most `cap` (>= 16 for tl.arange)."""
    return max(16, min(next_power_of_2(max(d, 1)), cap))


def least_waste_block(d, cap):
    """Column block of a kernel that tiles the row with several blocks: the power of two in [16, cap] that leaves
    the fewest masked lanes in the last block (cdiv(d, b) * b - d), the widest of those on ties (fewer programs);
    D = 1152 -> 128 (9 full blocks), 1024 -> 1024, 72 -> 16 (5 blocks, 8 idle lanes)."""
    widths = [1 << k for k in range(4, max(cap, 16).bit_length())]
    return min(reversed(widths), key=lambda b: cdiv(max(d, 1), b) * b - max(d, 1))


# Elements per program tile of the default configurations: a [rows, BLOCK_D] tile holds about this many (rows =
# TILE // BLOCK_D), so narrow rows are batched and wide rows (D = 1152 -> 2048 columns) take 2 rows per program.
TILE = 4096


def rows_per_tile(block):
    """Rows of a default [rows, block] tile (a power of two since block is)."""
    return max(1, TILE // block)


def num_warps(elements):
    """Default warps of a tile: 4 up to 2048 elements, 8 above (<= 16 values per thread per operand at TILE)."""
    return 4 if elements <= 2048 else 8


def rows(block_rows, n):
    """A configuration's rows per tile, no more than the n rows there are (rounded up to a power of two)."""
    return min(block_rows, next_power_of_2(max(n, 1)))


def split(total, other_programs):
    """Splits a reduction over `total` items into chunks: returns (items_per_chunk, n_chunks) with
    other_programs * n_chunks about TARGET_PROGRAMS and n_chunks <= MAX_CHUNKS (at least one chunk)."""
    want = max(1, min(total, MAX_CHUNKS, cdiv(TARGET_PROGRAMS, max(other_programs, 1))))
    per = max(1, cdiv(total, want))
    return per, max(1, cdiv(total, per))


@functools.lru_cache(maxsize=None)
def width_key(D):
    """_config.shape_key(D=D), built once per width: the tuned-configuration key of the glue kernels."""
    return shape_key(D=D)


def require_contiguous(t, name):
    """Low-level launchers index with packed row-major offsets."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got shape {tuple(t.shape)}, strides {t.stride()})")


@triton.jit
def last_to_arrive(
    counter,   # pointer to this reduction's int32 arrival counter (zeroed before the launch)
    n_parts,   # programs contributing a partial sum to it
):
    """After a program has stored its partial sum: True in the program that arrives last at the counter.

    The barrier orders every thread's partial-sum stores before the (scalar, single-thread) acq_rel atomic,
    which releases them to the last program; its acquire makes all of them visible there."""
    tl.debug_barrier()
    return tl.atomic_add(counter, 1, sem="acq_rel") == n_parts - 1


@triton.jit
def sum_parts(
    parts,        # pointer to partial sum 0 of this output tile
    part_stride,  # elements between consecutive partial sums
    n_parts,      # partial sums to add
    offs,         # offsets of the tile within one partial sum
    mask,         # valid elements of the tile
):
    """Sum of the n_parts partial tiles in index order (deterministic, whatever order the programs ran in);
    read past L1, which may hold no line written by another program."""
    acc = tl.load(parts + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for i in range(1, n_parts):
        acc += tl.load(parts + i * part_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def normalized_tile(
    x_ptr,        # flat [rows, D] LayerNorm input
    mean_ptr,     # [rows] its row means, saved by the forward
    rstd_ptr,     # [rows] its row 1 / sqrt(var + eps), saved by the forward
    rows,         # [BLOCK_R] row indices of the tile
    offs,         # [BLOCK_R, BLOCK_D] element offsets of the tile in x
    rmask,        # [BLOCK_R] valid rows
    mask,         # [BLOCK_R, BLOCK_D] valid elements
    ACC: tl.constexpr,  # arithmetic dtype
):
    """(xhat, rstd) of a LayerNorm backward's tile from the forward's statistics: xhat is 0 outside mask and rstd
    0 on invalid rows, so every term of the backward is 0 there."""
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0).to(ACC)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0), rstd


@triton.jit
def merge_moments(
    mean,     # [BLOCK_R] row means of the first `seen` columns
    m2,       # [BLOCK_R] their sums of squared deviations from the mean
    v,        # [BLOCK_R, BLOCK_D] the next columns of the rows, ACC
    mask,     # [BLOCK_R, BLOCK_D] valid elements of v
    seen,     # columns before v (a multiple of BLOCK_D)
    D,        # row width
    BLOCK_D: tl.constexpr,
):
    """(mean, m2) of the first seen + BLOCK_D columns (at most D) of each row: a chunked-row LayerNorm's
    statistics, one column chunk at a time. The chunk is centred on its own mean and merged pairwise (Chan, Golub
    and LeVeque), so nothing cancels when |mean| >> std as in a one-pass sum of squares."""
    n = tl.minimum(BLOCK_D, D - seen)
    chunk_mean = tl.sum(tl.where(mask, v, 0.0), axis=1) / n
    dev = tl.where(mask, v - chunk_mean[:, None], 0.0)
    delta = chunk_mean - mean
    total = seen + n
    return mean + delta * n / total, m2 + tl.sum(dev * dev, axis=1) + delta * delta * seen * n / total


@triton.jit
def chunk(
    rows,     # [BLOCK_R] row indices
    crows,    # [BLOCK_R] their conditioning rows
    rmask,    # [BLOCK_R] valid rows
    d0,       # first column of the chunk
    D,        # row width
    BLOCK_D: tl.constexpr,
):
    """(cols, mask, offs, coffs) of the [BLOCK_R, BLOCK_D] chunk of a chunked-row kernel at column d0: its column
    indices, valid elements, and element offsets in the rows and in their conditioning rows."""
    cols = d0 + tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    return cols, mask, rows[:, None] * D + cols[None, :], crows[:, None] * D + cols[None, :]


@triton.jit
def ln_bwd_chunk(
    x_ptr,      # flat [rows, D] LayerNorm input
    mean_ptr,   # [rows] its row means, saved by the forward
    rstd_ptr,   # [rows] its row 1 / sqrt(var + eps)
    dh_ptr,     # flat [rows, D] grad of the modulated output
    scale_ptr,  # forward scale: [B, D], or [rows, D] when PER_TOKEN
    b,          # the sample of the rows
    rows,       # [BLOCK_R] row indices
    rmask,      # [BLOCK_R] valid rows
    d0,         # first column of the chunk
    D,
    PER_TOKEN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The chunk at column d0 of a chunked-row LayerNorm-modulate backward: (cols, mask, offs, coffs, xhat, rstd,
    dh, dxhat = dh * (1 + scale)), every tile 0 off mask. A per-sample coffs is b's row, broadcast over rows."""
    crows = rows if PER_TOKEN else tl.zeros_like(rows) + b
    cols, mask, offs, coffs = chunk(rows, crows, rmask, d0, D, BLOCK_D)
    xhat, rstd = normalized_tile(x_ptr, mean_ptr, rstd_ptr, rows, offs, rmask, mask, ACC)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(ACC)
    dxhat = dh * (1.0 + tl.load(scale_ptr + coffs, mask=mask, other=0.0).to(ACC))
    return cols, mask, offs, coffs, xhat, rstd, dh, dxhat


@triton.jit
def dxhat_row_means(
    x_ptr, mean_ptr, rstd_ptr, dh_ptr, scale_ptr, b, rows, rmask, D,  # as ln_bwd_chunk's
    PER_TOKEN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """First pass of a chunked-row LayerNorm-modulate backward over a tile of rows: the row means of dxhat and of
    dxhat * xhat (0 on invalid rows), which the second pass's dx needs before it can write anything."""
    s = tl.zeros([BLOCK_R], dtype=ACC)
    s_xhat = tl.zeros([BLOCK_R], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        _, _, _, _, xhat, _, _, dxhat = ln_bwd_chunk(x_ptr, mean_ptr, rstd_ptr, dh_ptr, scale_ptr, b, rows, rmask, d0,
                                                      D, PER_TOKEN, ACC, BLOCK_D)
        s += tl.sum(dxhat, axis=1)
        s_xhat += tl.sum(dxhat * xhat, axis=1)
    return s / D, s_xhat / D


@triton.jit
def add_to_part(
    ptr,      # [BLOCK_D] pointers into this program's own partial row
    value,    # [BLOCK_D] this token tile's column sums
    cmask,    # [BLOCK_D] valid columns
    added,    # whether the row holds earlier token tiles' sums (else it holds garbage: stored over)
):
    """Read-modify-write of a partial row only this program writes. The caller puts a tl.debug_barrier() between
    token tiles: a column reduced over rows may be held by several threads, and the one that loads it next need not
    be the one that stored it."""
    tl.store(ptr, tl.load(ptr, mask=cmask & added, other=0.0) + value, mask=cmask)


@triton.jit
def store_sum_of_parts(
    out_ptr,      # [D] output row
    parts,        # pointer to partial row 0
    part_stride,  # elements between consecutive partial rows
    n_parts,      # partial rows to add
    D,
    BLOCK_D: tl.constexpr,
):
    """out = the sum of the partial rows in index order (sum_parts), BLOCK_D columns at a time."""
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        total = sum_parts(parts, part_stride, n_parts, cols, cmask)
        tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=cmask)


# Compiled kernels by (kernel, device, specialization, options): see `launch`.
_compiled = {}


def launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta), with the constexprs and launch options (num_warps, num_stages) in meta.

    triton's JITFunction.run binds, specializes and hashes the arguments, reads its settings and checks the
    kernel's globals on every call. Here triton's own binder still decides the specialization (argument dtypes,
    pointer alignment, integer properties, constexprs, options: whatever the installed triton keys its cache on),
    JITFunction.run compiles each new one once (warmup, no launch), and every launch, the first included, calls
    the compiled kernel's launcher the way JITFunction.run does. That tail is the part that differs between
    triton versions, so it lives here only (triton 3.6-3.9: every bound argument, constexprs included, goes to
    the launcher; a compile may come back as a future in asynchronous-compile mode). Under the interpreter the
    kernel runs through triton as usual.
    """
    if isinstance(kernel, InterpretedFunction):
        kernel[grid](*args, **meta)
        return
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    bound, specialization, options = kernel.device_caches[device][-1](*args, **meta)  # the binder, last entry
    key = (kernel, device, tuple(specialization), tuple(options.items()))
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = kernel.run(*args, grid=grid, warmup=True, **meta)
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        _compiled[key] = compiled
    stream = driver.get_current_stream(device)
    values = bound.values()
    runner = compiled.run  # loads the module on first use, which sets compiled.function
    runner(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, compiled.function,
           compiled.packed_metadata, compiled.launch_metadata(grid, stream, *values), knobs.runtime.launch_enter_hook,
           knobs.runtime.launch_exit_hook, *values)
