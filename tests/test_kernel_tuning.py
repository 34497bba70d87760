"""The launch configurations of the Triton kernels: every launcher takes its configuration from
kernels/_config.py's `tuned(family, key, default, device)`, and every candidate in a kernel module's TUNING (the
space a GPU sweep times through `_config.override`) gives correct results (under the interpreter on CPU, at a
shape where each tile size is used whole) and compiled for sm_90 without spills (the committed table of
benchmarks/compile_sm90.py)."""
import functools
import glob
import importlib
import json
import os

import pytest
import torch

from conftest import assert_checks, grad_generator
from maskdit_fast.accuracy import check_op
from maskdit_fast.indexing import cu_seqlens_from_counts, random_keep_ids
from maskdit_fast.kernels import _config, flash_attn, gather_scatter, modulate, residual_modulate
from maskdit_fast.ops import gather_scatter as gs
from maskdit_fast.ops import modulate as md

at = importlib.import_module("maskdit_fast.ops.attention")  # the package exports a function of that name
MODULES = (modulate, gather_scatter, flash_attn)
FAMILIES = ("attn_fwd", "attn_bwd", "gather", "scatter", "ln_modulate_fwd", "ln_modulate_bwd", "gated_residual_fwd",
            "gated_residual_bwd")
CANDIDATES = [(family, i) for module in MODULES for family in module.TUNING for i in range(len(module.TUNING[family]))]
# The fused residual op's candidates are checked for correctness in tests/test_ops_residual_modulate.py (two outputs);
# the compile table covers them here with the others.
COMPILED_MODULES = MODULES + (residual_modulate,)
COMPILED = [(family, i) for module in COMPILED_MODULES for family in module.TUNING
            for i in range(len(module.TUNING[family]))]
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
# Shapes: more rows and tokens than any candidate's tile (16 rows, 128 queries), widths over the widest column block
B, L, K, D = 2, 17, 9, 1152
ATTN_LENGTHS, HEAD_DIM = [130, 3], 72


def test_every_family_has_candidates():
    assert sorted(f for m in MODULES for f in m.TUNING) == sorted(FAMILIES)
    for module in MODULES:
        for family, candidates in module.TUNING.items():
            assert candidates and all(isinstance(c, dict) and "num_warps" in c for c in candidates), family


def test_layernorm_families_have_chunked_candidates():
    """Each LayerNorm family lists candidates with a BLOCK_D narrower than D, so the correctness test below (and
    tests/test_ops_residual_modulate.py's) runs their chunked-row path, and whole-row ones without BLOCK_D."""
    for module, families in ((modulate, ("ln_modulate_fwd", "ln_modulate_bwd")), (residual_modulate, None)):
        for family in families or module.TUNING:
            widths = [c.get("BLOCK_D") for c in module.TUNING[family]]
            assert None in widths and any(w is not None and w < D for w in widths), family


@pytest.mark.parametrize("width,block", [(1152, 128), (1024, 1024), (512, 512), (72, 16), (100, 16), (1, 16),
                                         (3000, 64), (384, 128)])
def test_default_column_block_wastes_the_fewest_lanes(width, block):
    """The default column block of the column-tiled kernels (gated residual, gather/scatter): fewest masked lanes
    over the row, the widest such block, a tile of about TILE elements."""
    from maskdit_fast.kernels import _common
    assert _common.least_waste_block(width, 1024) == block
    defaults = [modulate._default(f, width) for f in ("gated_residual_fwd", "gated_residual_bwd")]
    for config in defaults + [gather_scatter._default(width)]:
        assert config["BLOCK_D"] == block and config["BLOCK_R"] * block == _common.TILE


def _op_checks(family, device):
    """check_op rows of the op whose kernels use `family`, forward and backward, fp32 (bf16 for the glue)."""
    gen = torch.Generator().manual_seed(hash(family) % 2**31)
    dgen = grad_generator(gen, device)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    if family.startswith("attn"):
        lengths = ATTN_LENGTHS
        cu = cu_seqlens_from_counts(lengths, device)

        def ref(q, k, v):
            return at.varlen_attention_ref(q, k, v, cu, cu, causal=True, compute_dtype=q.dtype)[0]
        op = functools.partial(at.varlen_attention, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
                               max_seqlen_k=max(lengths), causal=True, backend="triton")
        qkv = [randn(sum(lengths), 2, HEAD_DIM) for _ in range(3)]
        return check_op(family, op, ref, qkv, dgen)
    ids = random_keep_ids(B, L, K, gen).to(device)
    if family == "gather":
        return check_op(family, functools.partial(gs.gather_tokens, backend="triton"), gs.gather_tokens_ref,
                        (randn(B, L, D, dtype=torch.bfloat16), ids, randn(L, D)), dgen)
    if family == "scatter":
        return check_op(family, functools.partial(gs.scatter_tokens, backend="triton"), gs.scatter_tokens_ref,
                        (randn(B, K, D, dtype=torch.bfloat16), ids, randn(D, dtype=torch.bfloat16), L, randn(L, D)),
                        dgen)
    x = randn(B, L, D, dtype=torch.bfloat16)
    if family.startswith("ln_"):
        return check_op(family, functools.partial(md.layernorm_modulate, backend="triton"),
                        md.layernorm_modulate_ref, (x, randn(B, D), randn(B, D)), dgen)
    return check_op(family, functools.partial(md.gated_residual, backend="triton"), md.gated_residual_ref,
                    (x, randn(B, L, D), randn(B, D)), dgen)


@pytest.mark.parametrize("family,index", CANDIDATES, ids=[f"{f}[{i}]" for f, i in CANDIDATES])
def test_every_candidate_is_correct(family, index, device):
    candidate = next(m.TUNING[family][index] for m in MODULES if family in m.TUNING)
    with _config.override(family, candidate):
        assert_checks(_op_checks(family, device))


def test_launchers_look_up_their_family_and_shape_key(monkeypatch, device):
    """The contract with the tuning sweep: family names and shape keys (D=<width>; Dh=<head dim>,L=<max seqlen
    rounded up to a power of two>), the tensors' device passed along."""
    seen = []
    real = _config.tuned

    def spy(family, key, default, device=None):
        seen.append((family, key, device.type))
        return real(family, key, default, device)
    for module in MODULES:
        monkeypatch.setattr(module, "tuned", spy)
    for family in FAMILIES:
        _op_checks(family, device)
    assert {(f, k) for f, k, _ in seen} == {
        ("attn_fwd", f"Dh={HEAD_DIM},L=256"), ("attn_bwd", f"Dh={HEAD_DIM},L=256"), ("gather", f"D={D}"),
        ("scatter", f"D={D}"), ("ln_modulate_fwd", f"D={D}"), ("ln_modulate_bwd", f"D={D}"),
        ("gated_residual_fwd", f"D={D}"), ("gated_residual_bwd", f"D={D}")}
    assert {d for _, _, d in seen} == {torch.device(device).type}


def _compile_table():
    tables = sorted(glob.glob(os.path.join(RESULTS, "*-sm90-compile.json")))
    assert tables, "no benchmarks/results/*-sm90-compile.json: run benchmarks/compile_sm90.py"
    with open(tables[-1]) as f:
        return json.load(f)["rows"]


@pytest.mark.parametrize("family,index", COMPILED, ids=[f"{f}[{i}]" for f, i in COMPILED])
def test_every_candidate_compiles_for_sm90_without_spills(family, index):
    candidate = next(m.TUNING[family][index] for m in COMPILED_MODULES if family in m.TUNING)
    rows = [r for r in _compile_table() if r["family"] == family and r["candidate"] == candidate]
    assert rows, f"{family} {candidate} is not in the committed compile table: rerun benchmarks/compile_sm90.py"
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows), rows


def test_defaults_compile_for_sm90_without_spills():
    rows = [r for r in _compile_table() if r["config"] == "default"]
    assert {r["family"] for r in rows} == set(FAMILIES) | set(residual_modulate.TUNING)
    assert all(r["spill_stores"] == 0 for r in rows), [r for r in rows if r["spill_stores"]]


def test_fused_attention_candidates_are_not_recorded_where_the_split_default_runs():
    """Past 128 tokens the launcher runs its split default instead of a fused-backward candidate: the compile
    table (and the sweep, through the same rule) has no rows of fused candidates there."""
    fused = next(c for c in flash_attn.TUNING["attn_bwd"] if c.get("FUSED"))
    assert flash_attn.config_applies("attn_bwd", fused, "Dh=72,L=128")
    assert not flash_attn.config_applies("attn_bwd", fused, "Dh=32,L=256")
    assert flash_attn.config_applies("attn_bwd", flash_attn.TUNING["attn_bwd"][0], "Dh=32,L=256")
    rows = [r for r in _compile_table() if r["family"] == "attn_bwd" and r["config"] != "default"]
    assert rows and all(flash_attn.config_applies("attn_bwd", r["candidate"], r["shape"]) for r in rows)
