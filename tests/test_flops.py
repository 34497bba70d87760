"""The analytic FLOP counter: the DiT paper's table, MaskDiT's split, and torch's FlopCounterMode."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from maskdit_fast.flops import model_flops, train_step_flops
from maskdit_fast.models import create_model


@pytest.mark.parametrize("name,gflops", [("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-L/2", 80.71),
                                         ("DiT-XL/2", 118.64), ("DiT-XL/4", 29.05), ("DiT-S/4", 1.41)])
def test_dit_paper_table_at_256px(name, gflops):
    f = model_flops(name, input_size=32, in_channels=4)
    assert round(f["total"] / 1e9, 2) == gflops
    assert f["decoder"] == 0 and f["total"] == f["encoder"] + f["other"]


def test_maskdit_xl2_cost_split():
    half = model_flops("MaskDiT-XL/2", mask_ratio=0.5)
    assert half["encoder_tokens"] == 128 and half["decoder_tokens"] == 256
    assert round(half["encoder"] / 1e9, 1) == 58.4
    assert round(half["decoder"] / 1e9, 1) == 7.1
    assert round(half["total"] / 1e9) == 65
    full = model_flops("MaskDiT-XL/2")
    assert round(full["total"] / 1e9) == 126
    # the encoder is the DiT-XL/2 trunk: at ratio 0 its blocks cost the same
    assert full["encoder"] == model_flops("DiT-XL/2")["encoder"]
    # attention and norm terms are parts of the encoder/decoder/other buckets
    assert 0 < full["attention"] < full["encoder"] + full["decoder"]
    assert 0 < full["norm"] < full["total"]


def test_decoder_fraction_of_smaller_maskdits():
    """The S/B/L decoders were sized for about XL's decoder/encoder cost fraction."""
    ratios = {s: (lambda f: f["decoder"] / f["encoder"])(model_flops(f"MaskDiT-{s}/2", mask_ratio=0.5))
              for s in ("S", "B", "L", "XL")}
    assert all(abs(r - ratios["XL"]) < 0.03 for r in ratios.values()), ratios


def test_train_step_and_batch_scaling():
    one = model_flops("MaskDiT-B/4", mask_ratio=0.5)
    eight = model_flops("MaskDiT-B/4", mask_ratio=0.5, batch=8)
    for key in ("encoder", "decoder", "other", "attention", "norm", "total"):
        assert eight[key] == 8 * one[key]
    assert train_step_flops("MaskDiT-B/4", mask_ratio=0.5, batch=8) == 6 * eight["total"]


def test_model_instance_and_errors():
    with torch.device("meta"):
        model = create_model("MaskDiT-S/2", input_size=16, in_channels=3)
    assert model_flops(model, mask_ratio=0.25) == model_flops("MaskDiT-S/2", 16, 3, mask_ratio=0.25)
    assert model_flops(torch.compile(model)) == model_flops(model)  # wrapper unwrapped, not compiled
    # the same weights at another input size (mixed resolutions) count as the preset at that size
    assert model_flops(model, input_size=(8, 16)) == model_flops("MaskDiT-S/2", (8, 16), 3)
    with pytest.raises(ValueError, match="differs"):
        model_flops(model, in_channels=4)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model_flops(model, input_size=15)
    with pytest.raises(ValueError, match="DiT does not mask"):
        model_flops("DiT-S/2", mask_ratio=0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        model_flops("MaskDiT-S/2", mask_ratio=1.0)
    with pytest.raises(ValueError, match="unknown model"):
        model_flops("UNet-S/2")
    with pytest.raises(TypeError):
        model_flops(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch"):
        model_flops("DiT-S/2", batch=0)


@pytest.mark.parametrize("name,overrides,ratio", [
    ("DiT-S/4", dict(num_classes=10), 0.0),
    ("MaskDiT-S/4", dict(num_classes=10), 0.5),
    ("MaskDiT-S/2", dict(num_classes=0, learn_sigma=True, decoder_depth=2), 0.0),
    ("MaskDiT-B/8", dict(input_size=(16, 32)), 0.3),
])
def test_matches_torch_flop_counter(name, overrides, ratio):
    """FlopCounterMode counts 2 FLOPs per MAC of mm/addmm/bmm/conv; with the math SDPA back-end
    attention runs as bmm and is counted too; LayerNorm is not counted."""
    kwargs = dict(input_size=16, in_channels=3, depth=2)
    kwargs.update(overrides)
    model = create_model(name, **kwargs)
    h, w = model.input_size
    batch = 2
    x = torch.randn(batch, 3, h, w)
    y = torch.full((batch,), model.num_classes)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(x, torch.rand(batch), y, mask_ratio=ratio)
    f = model_flops(model, mask_ratio=ratio, batch=batch)
    assert counter.get_total_flops() == 2 * (f["total"] - f["norm"])
