"""The trainer's packed options: per-sample mask ratios (--mask-ratio-range) and mixed-resolution
batches (--mixed-resolutions) on the digits-tiny preset: equivalence with the plain ratio, kept
counts, exact resume, world-size-independent draws, and clear errors."""
import types

import pytest
import torch

from maskdit_fast import train as T
from maskdit_fast.config import parse_config
from maskdit_fast.data import DataStream, build_dataset
from maskdit_fast.masking import PackedMask, is_per_sample, pack_ids_keep
from maskdit_fast.models import MaskDiT
from test_data import write_latents
from test_train import metrics, tiny


@pytest.fixture
def packed_calls(monkeypatch):
    """Records (x shapes, mask ratios (lists as float64 tensors), masks) of every MaskDiT forward with
    per-sample masks or groups (as lists of groups; a plain ratio or [B, K] ids_keep is not recorded)."""
    calls, real = [], MaskDiT.forward

    def spy(self, x, t, y, mask_ratio=0.0, ids_keep=None):
        outs = real(self, x, t, y, mask_ratio, ids_keep)
        if isinstance(x, list):
            calls.append(([tuple(xg.shape) for xg in x], [_ratios(r) for r in mask_ratio], [o.mask for o in outs]))
        elif is_per_sample(mask_ratio) or isinstance(ids_keep, (PackedMask, list)):
            calls.append(([tuple(x.shape)], [_ratios(mask_ratio)], [outs.mask]))
        return outs

    monkeypatch.setattr(MaskDiT, "forward", spy)
    return calls


def _ratios(mask_ratio):
    return torch.tensor(mask_ratio, dtype=torch.float64) if isinstance(mask_ratio, list) else mask_ratio


def test_equal_bounds_match_plain_ratio(tmp_path, packed_calls):
    overrides = dict(steps=4, sample_per_class=0)
    T.train(tiny(tmp_path / "plain", mask_ratio=0.25, **overrides), progress=False)
    assert not packed_calls  # the plain ratio makes no per-sample request
    T.train(tiny(tmp_path / "range", mask_ratio_range=[0.25, 0.25], **overrides), progress=False)
    assert len(packed_calls) == 4  # ... and the range one per step, with the same masks and draws
    plain, ranged = metrics(tmp_path / "plain"), metrics(tmp_path / "range")
    torch.testing.assert_close([r["loss"] for r in ranged], [r["loss"] for r in plain], rtol=1e-5, atol=0)
    # equal counts run the dense encoder, as the plain ratio does: the same numbers, not just close
    assert [r["loss"] for r in ranged] == [r["loss"] for r in plain]
    assert [r["mask_ratio"] for r in ranged] == [0.25] * 4


def test_range_counts_unmasked_phase_and_exact_resume(tmp_path, packed_calls):
    overrides = dict(steps=5, unmasked_steps=1, mask_ratio_range=[0.1, 0.7], grad_accum=2, ckpt_every=100,
                     sample_per_class=0)
    T.train(tiny(tmp_path / "a", **overrides), progress=False)
    ratios = torch.cat([call[1][0] for call in packed_calls])
    assert len(packed_calls) == 8 and ratios.shape == (8 * 8,)  # 4 masked steps x 2 micro-batches of 8
    assert ((ratios >= 0.1) & (ratios < 0.7)).all() and ratios.unique().numel() == ratios.numel()
    L = 16  # 8x8 digits, patch 2
    for _, (r,), (mask,) in packed_calls:
        kept = (mask == 0).sum(1)
        assert kept.tolist() == [int(L * (1 - float(v))) for v in r]
    records = metrics(tmp_path / "a")
    assert [r["mask_ratio"] for r in records] == pytest.approx([0.4] * 4 + [0.0])  # the mean, then unmasked

    first = T.train(tiny(tmp_path / "b", **overrides), stop_at=2, progress=False)
    assert first["interrupted"]
    T.train(tiny(tmp_path / "b", **overrides), progress=False)
    assert [r["loss"] for r in metrics(tmp_path / "b")] == [r["loss"] for r in records]


def test_mixed_resolutions_end_to_end_and_resume(tmp_path, packed_calls):
    overrides = dict(steps=4, unmasked_steps=1, mixed_resolutions=[8, 4], mask_ratio_range=[0.2, 0.6],
                     ckpt_every=100)
    result = T.train(tiny(tmp_path / "a", **overrides), progress=False)
    assert result["step"] == 4 and result["grid"].endswith(".png")  # sampled at the data's 8x8
    train_calls = packed_calls
    assert len(train_calls) == 4  # every step, the unmasked one too (sampling runs the dense path)
    for shapes, ratios, masks in train_calls:  # one packed pass over both groups, 8 samples each
        assert shapes == [(8, 1, 8, 8), (8, 1, 4, 4)] and [m.shape for m in masks] == [(8, 16), (8, 4)]
    for _, ratios, masks in train_calls[:3]:
        for r, m in zip(ratios, masks):
            assert (m == 0).sum(1).tolist() == [int(m.shape[1] * (1 - float(v))) for v in r]
    assert all((m == 0).all() for m in train_calls[3][2])  # the unmasked phase keeps every token
    records = metrics(tmp_path / "a")
    assert all(r["finite"] == 1.0 for r in records)
    T.train(tiny(tmp_path / "b", **overrides, sample_per_class=0), stop_at=2, progress=False)
    T.train(tiny(tmp_path / "b", **overrides, sample_per_class=0), progress=False)
    assert [r["loss"] for r in metrics(tmp_path / "b")] == [r["loss"] for r in records]


def _rank_losses(cfg, world_size, net, loss_fn):
    """micro_step_loss of every rank of `world_size` on the first global micro-batch."""
    dataset = build_dataset("digits")
    shapes = T.group_shapes(cfg, dataset.sample_shape, net.patch_size)
    precond = T.EDMPrecond(net, cfg.sigma_data)
    outs = []
    for rank in range(world_size):
        state = types.SimpleNamespace(
            net=net, stream=DataStream(dataset, 8, 0, rank=rank, world_size=world_size),
            loss_gen=torch.Generator().manual_seed(0), ratio_gen=torch.Generator().manual_seed(1))
        x, y = state.stream.next_batch()
        with torch.no_grad():
            outs.append(T.micro_step_loss(cfg, state, loss_fn, precond, x, y, 0.5, shapes))
    return outs


@pytest.mark.parametrize("mixed", [[], [8, 4]])
def test_draws_do_not_depend_on_world_size(mixed):
    cfg = tiny("unused", mask_ratio_range=[0.1, 0.7], mixed_resolutions=mixed)
    net = T.build_model(cfg, (1, 8, 8)).eval()
    loss_fn = T.build_loss(cfg)
    (whole,), halves = _rank_losses(cfg, 1, net, loss_fn), _rank_losses(cfg, 2, net, loss_fn)
    # every rank holds whole samples of the global batch: the same per-sample terms, the same mean
    torch.testing.assert_close(torch.cat([h.per_sample for h in halves]).sort().values,
                               whole.per_sample.sort().values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((halves[0].loss + halves[1].loss) / 2, whole.loss, rtol=1e-5, atol=1e-6)


def test_packed_rows():
    packed = pack_ids_keep([torch.tensor([3, 1]), torch.tensor([0]), torch.tensor([2, 0, 1]), torch.tensor([5])])
    part = T.packed_rows(packed, slice(1, 3))
    assert isinstance(part, PackedMask) and part.counts == (1, 3)
    assert part.ids.tolist() == [0, 2, 0, 1] and part.cu_seqlens.tolist() == [0, 1, 4]


def test_bad_values(tmp_path):
    for argv, match in [(["--mask-ratio-range", "0.5", "0.2"], "low <= high"),
                        (["--mask-ratio-range", "0.2", "1.0"], r"in \[0, 1\)"),
                        (["--mask-ratio-range", "-0.1", "0.2"], r"in \[0, 1\)"),
                        (["--mask-ratio-range", "0.1", "0.2", "--mask-schedule", "linear",
                          "--mask-ratio-end", "0.1"], "mask_schedule constant"),
                        (["--mixed-resolutions", "8", "8"], "duplicates"),
                        (["--mixed-resolutions", "0"], "positive ints")]:
        with pytest.raises(ValueError, match=match):
            parse_config(["--preset", "digits-tiny"] + argv)
    with pytest.raises(SystemExit):  # argparse: the range takes exactly two values
        parse_config(["--preset", "digits-tiny", "--mask-ratio-range", "0.1"])
    cfg = parse_config(["--preset", "digits-tiny", "--mask-ratio-range", "0", "0.5", "--mixed-resolutions", "8", "4"])
    assert cfg.mask_ratio_range == [0.0, 0.5] and cfg.mixed_resolutions == [8, 4]

    data = write_latents(tmp_path / "lat", n=12, shape=(4, 4, 4), num_classes=3)
    run = tmp_path / "run"
    for overrides, match in [(dict(mixed_resolutions=[8, 3]), "integer factor"),
                             (dict(mixed_resolutions=[8, 2], mask_ratio=0.5), "keeps no token"),
                             (dict(mixed_resolutions=[8, 4, 2], mask_ratio=0.0), "divisible by"),
                             (dict(mixed_resolutions=[8, 4], model="DiT-S/2"), "need a MaskDiT"),
                             (dict(mask_ratio_range=[0.2, 0.4], model="DiT-S/2"), "need a MaskDiT"),
                             (dict(mixed_resolutions=[4, 2], data=data, num_classes=3, batch_size=4),
                              "needs pixel data")]:
        if overrides.get("model") == "DiT-S/2":
            overrides["model_kwargs"] = dict(hidden_size=32, depth=1, num_heads=2)
        with pytest.raises(ValueError, match=match):
            T.train(tiny(run, **overrides), progress=False)
    assert not run.exists()  # rejected before anything is written


def test_one_group_at_the_data_size_trains_like_the_plain_batch(tmp_path):
    """micro_step_loss has one path: the single-resolution batch is its one group. --mixed-resolutions
    at the data's own size (a list of one group through the model's grouped forward) draws the same
    masks, noise levels and noise as the plain run and, its samples keeping equal counts, runs the same
    dense encoder: the same losses, not just close ones."""
    overrides = dict(steps=3, sample_per_class=0, grad_accum=2)
    T.train(tiny(tmp_path / "plain", **overrides), progress=False)
    T.train(tiny(tmp_path / "group", mixed_resolutions=[8], **overrides), progress=False)
    plain, group = metrics(tmp_path / "plain"), metrics(tmp_path / "group")
    assert [r["loss"] for r in group] == [r["loss"] for r in plain] and len(plain) == 3
    assert [r["grad_norm"] for r in group] == [r["grad_norm"] for r in plain]
