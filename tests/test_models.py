"""DiT / MaskDiT: presets and parameter counts, masking invariants, initialisation, equivalences,
an independent re-implementation of the official forwards, official checkpoint loading, errors."""
import collections
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdit_fast import accuracy, ops
from maskdit_fast.masking import check_ids_keep, mask_from_ids_keep, num_kept, random_masking_ids
from maskdit_fast.models import SIZES, DiT, MaskDiT, ModelOutput, create_model, get_2d_sincos_pos_embed, preset_names
from maskdit_fast.official import from_official

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=5)
TINY_DEC = dict(decoder_depth=2, decoder_hidden_size=16, decoder_num_heads=2)


def _randomize(model, seed=0):
    """Fresh models output zeros (adaLN-Zero); give every parameter a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _inputs(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = model.input_size
    x = torch.randn(batch, model.in_channels, h, w, generator=g)
    t = torch.randn(batch, generator=g)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)
    y[-1] = model.num_classes  # always include the null class
    return x, t, y


# ----------------------------------------------------------------------------------------------
# Presets and parameter counts

@pytest.mark.parametrize("name,millions", [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458),
                                           ("DiT-XL/2", 675), ("MaskDiT-XL/2", 730)])
def test_param_counts_match_papers(name, millions):
    with torch.device("meta"):  # shapes only, nothing allocated
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6) == millions


def test_maskdit_xl2_matches_official_shapes():
    """MaskDiT-XL/2's parameter count from the official layout, written out by hand."""
    D, Dd, L, p, C, depth, ddepth, ncls = 1152, 512, 256, 2, 4, 28, 8, 1000

    def block(width, cond):
        return (width * 3 * width + 3 * width) + (width * width + width) + 2 * (width * 4 * width) \
            + 4 * width + width + (cond * 6 * width + 6 * width)
    expected = (D * C * p * p + D) + (256 * D + D + D * D + D) + ncls * D + depth * block(D, D) \
        + (D * Dd + Dd + D * 2 * D + 2 * D) + Dd + ddepth * block(Dd, D) \
        + (Dd * p * p * C + p * p * C + D * 2 * Dd + 2 * Dd)
    with torch.device("meta"):
        model = create_model("MaskDiT-XL/2")
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.pos_embed.shape == (1, L, D) and model.decoder_pos_embed.shape == (1, L, Dd)


def test_every_preset_builds_with_its_sizes():
    names = preset_names()
    assert len(names) == 24
    for name in names:
        with torch.device("meta"):
            model = create_model(name)
        size, patch = name.split("-")[1].split("/")
        depth, width, heads, dec_depth, dec_width, dec_heads = SIZES[size]
        assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (depth, width, heads, int(patch))
        assert len(model.blocks) == depth
        if name.startswith("MaskDiT"):
            assert isinstance(model, MaskDiT) and not model.learn_sigma and model.out_channels == 4
            assert (len(model.decoder_blocks), model.decoder_hidden_size) == (dec_depth, dec_width)
            assert model.decoder_blocks[0].attn.num_heads == dec_heads
        else:
            assert isinstance(model, DiT) and model.learn_sigma and model.out_channels == 8


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_forward_backward(name):
    """Each preset at a small size with 1 block (widths, heads and patch size as the preset),
    freshly initialised (randomising the big ones would dominate the run time)."""
    overrides = dict(input_size=16, in_channels=3, num_classes=7, depth=1)
    if name.startswith("MaskDiT"):
        overrides["decoder_depth"] = 1
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    x, t, y = _inputs(model, batch=2)
    ratio = 0.5 if isinstance(model, MaskDiT) else 0.0
    out = model(x, t, y, mask_ratio=ratio)
    assert isinstance(out, ModelOutput)
    assert out.sample.shape == (2, model.out_channels, 16, 16)
    L = (16 // model.patch_size) ** 2
    if ratio:
        assert out.mask.shape == (2, L) and int(out.mask[0].sum()) == L - num_kept(L, ratio)
    else:
        assert out.mask is None
    out.sample.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_model_config_and_null_class():
    model = create_model("MaskDiT-S/4", input_size=(8, 16), num_classes=10, depth=1, decoder_depth=1)
    assert model.null_class == model.num_classes == 10
    assert model.config["input_size"] == (8, 16)
    rebuilt = MaskDiT(**model.config)
    assert rebuilt.config == model.config
    assert DiT(**create_model("DiT-B/8", depth=1).config).config["hidden_size"] == 768


# ----------------------------------------------------------------------------------------------
# Masking

def test_random_masking_invariants():
    B, L, ratio = 6, 20, 0.55
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = random_masking_ids(B, L, ratio, generator=g)
    K = int(L * (1 - ratio))
    assert ids_keep.shape == (B, K) and ids_keep.dtype == torch.int64
    assert ids_restore.shape == (B, L) and mask.shape == (B, L) and mask.dtype == torch.float32
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - K)))       # same K for every sample
    assert torch.equal(mask, mask_from_ids_keep(ids_keep, L))
    for b in range(B):
        kept = set(ids_keep[b].tolist())
        masked = set(torch.nonzero(mask[b]).flatten().tolist())
        assert len(kept) == K and kept.isdisjoint(masked) and kept | masked == set(range(L))
    # ids_restore inverts the shuffle: [kept, masked] gathered by ids_restore is the identity.
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :K], ids_keep)
    seq = torch.arange(L).expand(B, L)
    shuffled = torch.gather(seq, 1, ids_shuffle)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), seq)
    # per-sample independence: masks differ across samples
    assert len({tuple(m.tolist()) for m in mask}) == B
    # reproducible with a generator
    again = random_masking_ids(B, L, ratio, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids_keep)


def test_masking_validation():
    assert num_kept(256, 0.5) == 128 and num_kept(10, 0.0) == 10
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            random_masking_ids(2, 10, bad)
    with pytest.raises(ValueError, match="keeps no token"):
        num_kept(4, 0.9)
    with pytest.raises(TypeError):
        num_kept(4, "0.5")
    good = torch.tensor([[0, 3], [2, 1]])
    check_ids_keep(good, 2, 4)
    with pytest.raises(TypeError, match="int64"):
        check_ids_keep(good.int(), 2, 4)
    with pytest.raises(ValueError, match="shape"):
        check_ids_keep(good[:1], 2, 4)
    with pytest.raises(ValueError, match="outside"):
        check_ids_keep(torch.tensor([[0, 4], [2, 1]]), 2, 4)
    with pytest.raises(ValueError, match="duplicate"):
        check_ids_keep(torch.tensor([[0, 0], [2, 1]]), 2, 4)


# ----------------------------------------------------------------------------------------------
# Initialisation

def test_fresh_models_output_zero_and_blocks_are_identity():
    torch.manual_seed(0)
    dit = DiT(**TINY)
    mdit = MaskDiT(**TINY, **TINY_DEC)
    for model in (dit, mdit):
        x, t, y = _inputs(model)
        out = model(x, t, y)
        assert torch.equal(out.sample, torch.zeros_like(out.sample))
        c = model._condition(t, y)
        tokens = torch.randn(3, model.num_patches, model.hidden_size)
        for block in model.blocks:
            assert torch.equal(block(tokens, c), tokens)  # adaLN-Zero: gates are 0
    assert torch.equal(mdit(*_inputs(mdit), mask_ratio=0.5).sample, torch.zeros(3, 3, 8, 8))
    assert mdit.decoder_layer.linear.weight.abs().sum() == 0
    assert 0.01 < mdit.mask_token.std() < 0.04 and mdit.mask_token.requires_grad
    assert not any(name.endswith("pos_embed") for name, _ in mdit.named_parameters())
    # official init of the embedders
    with torch.no_grad():
        assert abs(float(dit.y_embedder.embedding_table.weight.std()) - 0.02) < 0.005
        assert abs(float(mdit.t_embedder.mlp[0].weight.std()) - 0.02) < 0.005


def test_sincos_pos_embed_matches_official_numpy():
    """Written from the MAE/DiT numpy functions: meshgrid(w, h), first half encodes grid[0]."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    D, n = 32, 4
    grid = np.stack(np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32)), axis=0)
    ref = np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)
    ours = get_2d_sincos_pos_embed(D, n)
    assert np.allclose(ours.numpy(), ref.astype(np.float32), atol=1e-7, rtol=0)
    rect = get_2d_sincos_pos_embed(D, (2, 4))  # rows 0..1 of the square 4x4 grid
    assert torch.allclose(rect, ours[:8], atol=1e-7, rtol=0)


def test_unpatchify_inverts_the_patch_layout():
    model = MaskDiT(**dict(TINY, input_size=(4, 8)), **TINY_DEC)
    x = torch.randn(2, 3, 4, 8)
    p, (h, w) = model.patch_size, model.grid_size
    tokens = x.reshape(2, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(2, h * w, p * p * 3)
    assert torch.equal(model.unpatchify(tokens), x)
    # the conv patch embedding orders tokens the same way (row-major over the grid)
    with torch.no_grad():
        model.x_embedder.proj.weight.zero_()
        model.x_embedder.proj.weight[0, 0, 0, 0] = 1
        model.x_embedder.proj.bias.zero_()
    assert torch.equal(model.x_embedder(x)[..., 0], x[:, 0, ::p, ::p].reshape(2, h * w))


# ----------------------------------------------------------------------------------------------
# Equivalences

def test_maskdit_full_permutation_equals_unmasked():
    model = _randomize(MaskDiT(**TINY, **TINY_DEC))
    x, t, y = _inputs(model)
    ref = model(x, t, y)
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(model.num_patches, generator=g) for _ in range(3)])
    out = model(x, t, y, ids_keep=ids)
    assert out.mask is None
    assert torch.allclose(out.sample, ref.sample, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ids[0], torch.arange(model.num_patches))


def test_maskdit_output_ignores_masked_patches():
    """The encoder sees kept tokens only and the decoder fills the rest with the mask token."""
    model = _randomize(MaskDiT(**TINY, **TINY_DEC))
    x, t, y = _inputs(model)
    ids_keep, _, mask = random_masking_ids(3, model.num_patches, 0.5, generator=torch.Generator().manual_seed(0))
    out = model(x, t, y, ids_keep=ids_keep)
    assert torch.equal(out.mask, mask)
    p, (h, w) = model.patch_size, model.grid_size
    pixel_mask = mask.reshape(3, 1, h, 1, w, 1).expand(3, 1, h, p, w, p).reshape(3, 1, h * p, w * p)
    x2 = x + 5 * torch.randn_like(x) * pixel_mask
    assert torch.equal(model(x2, t, y, ids_keep=ids_keep).sample, out.sample)
    x3 = x + 5 * torch.randn_like(x) * (1 - pixel_mask)  # kept patches do matter
    assert not torch.allclose(model(x3, t, y, ids_keep=ids_keep).sample, out.sample)
    # mask_ratio consistent with ids_keep is accepted
    assert torch.equal(model(x, t, y, mask_ratio=0.5, ids_keep=ids_keep).sample, out.sample)


def test_dit_and_maskdit_encoders_coincide_with_shared_weights():
    """With the same patch/time embedders, blocks, and DiT's label rows = MaskDiT's one-hot
    weights (null row = 0), the encoder outputs are identical."""
    mdit = _randomize(MaskDiT(**TINY, **TINY_DEC, learn_sigma=True))
    dit = DiT(**TINY)
    sd = {k: v for k, v in mdit.state_dict().items()
          if k.startswith(("x_embedder", "t_embedder", "blocks", "pos_embed"))}
    table = torch.cat([mdit.y_embedder.embedding_table.weight.t(), torch.zeros(1, TINY["hidden_size"])])
    dit.load_state_dict(dict(sd, **{"y_embedder.embedding_table.weight": table}), strict=False)
    outputs = {}
    for name, model in (("dit", dit), ("maskdit", mdit)):
        model.blocks[-1].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    x, t, y = _inputs(mdit)
    dit(x, t, y)
    mdit(x, t, y)
    assert torch.equal(outputs["dit"], outputs["maskdit"])


def test_labels_null_class_and_unconditional():
    mdit = _randomize(MaskDiT(**TINY, **TINY_DEC))
    t = torch.randn(2)
    null = torch.full((2,), mdit.null_class)
    assert torch.equal(mdit._condition(t, null), mdit.t_embedder(t))  # all-zero one-hot
    x, t3, y = _inputs(mdit)
    assert torch.equal(mdit(x, t3, None).sample, mdit(x, t3, torch.full((3,), 5)).sample)
    dit = _randomize(DiT(**TINY))
    assert torch.equal(dit._condition(t, null), dit.t_embedder(t) + dit.y_embedder.embedding_table.weight[-1])
    for model in (DiT(**dict(TINY, num_classes=0)), MaskDiT(**dict(TINY, num_classes=0), **TINY_DEC)):
        x, t, _ = _inputs(_randomize(model))
        assert model(x, t, torch.zeros(3, dtype=torch.long)).sample.shape[0] == 3
        with pytest.raises(ValueError, match="class labels"):
            model(x, t, torch.ones(3, dtype=torch.long))


def test_scalar_t_broadcasts():
    model = _randomize(DiT(**TINY))
    x, _, y = _inputs(model)
    assert torch.equal(model(x, torch.tensor(0.3), y).sample, model(x, torch.full((3,), 0.3), y).sample)


def test_backend_is_forwarded_to_every_op():
    model = _randomize(MaskDiT(**TINY, **TINY_DEC, backend="torch"))
    x, t, y = _inputs(model)
    out = model(x, t, y, mask_ratio=0.5, ids_keep=random_masking_ids(3, 16, 0.5)[0])
    assert out.sample.shape == (3, 3, 8, 8)
    model.backend = "no-such-backend"
    with pytest.raises(ValueError, match="unknown backend"):
        model(x, t, y)


MODEL_OPS = ("attention_qkvpacked", "varlen_attention_qkvpacked", "layernorm_modulate", "gated_residual",
             "gather_tokens", "gather_tokens_varlen", "scatter_tokens", "scatter_tokens_varlen")


def _checked_against_reference(monkeypatch, calls):
    """Make every op the model calls with backend="triton" also check itself, on the very inputs the model
    gives it, by maskdit_fast.accuracy's rule: its error against the float64 torch reference is at most 2x
    the error of the float32 torch reference (plus two float32 ulps of the output's scale, for ops that
    are exact in float32). A whole-model tolerance cannot do this: a random network amplifies rounding
    differently for the two back-ends (seen: 2.15x at the output with every op within its bound)."""
    def wrap(name, fn):
        def checked(*args, backend=None, **kwargs):
            out = fn(*args, backend=backend, **kwargs)
            if backend == "triton":
                calls[name] += 1
                def up(a):
                    return a.detach().double() if torch.is_tensor(a) and a.is_floating_point() else a
                with torch.no_grad():
                    ref64 = fn(*map(up, args), backend="torch", **{k: up(v) for k, v in kwargs.items()})
                    ref32 = fn(*(a.detach() if torch.is_tensor(a) else a for a in args), backend="torch",
                               **kwargs)
                err, bound = accuracy.compare(out.detach(), ref64, ref32)
                assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"
            return out
        return checked
    for name in MODEL_OPS:
        monkeypatch.setattr(ops, name, wrap(name, getattr(ops, name)))


def test_triton_backend_matches_torch_backend(device, monkeypatch):
    """The model through the Triton kernels (interpreted on CPU, see conftest; compiled on a GPU): every op
    call within 2x of torch's own float32 error (see `_checked_against_reference`), each op family
    exercised, and the output equal to the float64 torch model to float32-level accuracy, masked and
    unmasked."""
    model = _randomize(MaskDiT(**dict(TINY, hidden_size=64), **dict(TINY_DEC, decoder_hidden_size=32)))
    x, t, y = _inputs(model, batch=2)
    ids_keep = random_masking_ids(2, model.num_patches, 0.5, generator=torch.Generator().manual_seed(0))[0]
    model64 = copy.deepcopy(model).double()
    model, model64, x, t, y, ids_keep = (a.to(device) for a in (model, model64, x, t, y, ids_keep))
    calls = collections.Counter()
    _checked_against_reference(monkeypatch, calls)
    for ids in (ids_keep, None):
        model64.backend = "torch"
        ref = model64(x.double(), t.double(), y, ids_keep=ids).sample
        model.backend = "triton"
        out = model(x, t, y, ids_keep=ids).sample
        assert (out.double() - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert {"attention_qkvpacked", "layernorm_modulate", "gated_residual", "gather_tokens",
            "scatter_tokens"} <= set(calls)


# ----------------------------------------------------------------------------------------------
# Independent re-implementation of the official forwards (written from reading
# Anima-Lab/MaskDiT models/maskdit.py and facebookresearch/DiT models.py), on state dicts

def _lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _official_block(sd, pre, x, c, heads, sdpa=False):
    shift1, scale1, gate1, shift2, scale2, gate2 = _lin(sd, pre + ".adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
    h = _modulate(_ln(x), shift1, scale1)
    B, N, D = h.shape
    q, k, v = _lin(sd, pre + ".attn.qkv", h).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    if sdpa:  # timm >= 0.9 (fused attention)
        h = F.scaled_dot_product_attention(q, k, v)
    else:     # timm of DiT's time: explicit softmax
        h = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(dim=-1) @ v
    x = x + gate1.unsqueeze(1) * _lin(sd, pre + ".attn.proj", h.transpose(1, 2).reshape(B, N, D))
    h = _lin(sd, pre + ".mlp.fc2", F.gelu(_lin(sd, pre + ".mlp.fc1", _modulate(_ln(x), shift2, scale2)),
                                             approximate="tanh"))
    return x + gate2.unsqueeze(1) * h


def _official_t_embed(sd, t):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", emb)))


def _official_head(sd, x, c, p, out_ch):
    shift, scale = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    x = _lin(sd, "final_layer.linear", _modulate(_ln(x), shift, scale))
    n = int(x.shape[1] ** 0.5)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], n, n, p, p, out_ch))
    return x.reshape(x.shape[0], out_ch, n * p, n * p)


def _official_maskdit(sd, x, t, y_onehot, heads, dec_heads, out_ch, mask_dict=None):
    """MaskDiT forward in training mode (masking applied when mask_dict is given)."""
    p = sd["x_embedder.proj.weight"].shape[-1]
    x = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"]
    if mask_dict is not None:
        ids_keep = mask_dict["ids_keep"]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
    c = _official_t_embed(sd, t) + F.linear(y_onehot, sd["y_embedder.embedding_table.weight"])
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        x = _official_block(sd, f"blocks.{i}", x, c, heads)
    shift, scale = _lin(sd, "decoder_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    x = _lin(sd, "decoder_layer.linear", _modulate(_ln(x), shift, scale))
    if mask_dict is not None:  # unmask_tokens: append mask tokens, unshuffle with ids_restore
        ids_restore = mask_dict["ids_restore"]
        tokens = sd["mask_token"].repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)
        x = torch.gather(torch.cat([x, tokens], dim=1), 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = x + sd["decoder_pos_embed"]
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})):
        x = _official_block(sd, f"decoder_blocks.{i}", x, c, dec_heads)
    return _official_head(sd, x, c, p, out_ch)


def _official_dit(sd, x, t, y, heads, out_ch, sdpa=False):
    p = sd["x_embedder.proj.weight"].shape[-1]
    x = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"]
    c = _official_t_embed(sd, t) + F.embedding(y, sd["y_embedder.embedding_table.weight"])
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        x = _official_block(sd, f"blocks.{i}", x, c, heads, sdpa)
    return _official_head(sd, x, c, p, out_ch)


OFFICIAL_MASKDIT_KEYS = (
    ["x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "decoder_pos_embed", "mask_token",
     "y_embedder.embedding_table.weight", "decoder_layer.linear.weight", "decoder_layer.linear.bias",
     "decoder_layer.adaLN_modulation.1.weight", "decoder_layer.adaLN_modulation.1.bias",
     "final_layer.linear.weight", "final_layer.linear.bias",
     "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
    + [f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    + [f"{blocks}.{i}.{layer}.{w}" for blocks in ("blocks", "decoder_blocks") for i in range(2)
       for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
       for w in ("weight", "bias")])


def test_state_dict_keys_are_the_official_ones():
    assert set(MaskDiT(**TINY, **TINY_DEC).state_dict()) == set(OFFICIAL_MASKDIT_KEYS)
    dit_keys = {k for k in OFFICIAL_MASKDIT_KEYS if not k.startswith(("decoder", "mask_token"))}
    assert set(DiT(**TINY).state_dict()) == dit_keys


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_maskdit_matches_official_forward(ratio):
    model = _randomize(MaskDiT(**TINY, **TINY_DEC))
    sd = model.state_dict()
    x, t, y = _inputs(model)
    y_onehot = torch.zeros(3, model.num_classes)
    real = y < model.num_classes
    y_onehot[real, y[real]] = 1.0  # official: null class = all-zero row
    mask_dict = None
    ids_keep = None
    if ratio:
        ids_keep, ids_restore, mask = random_masking_ids(3, model.num_patches, ratio,
                                                         generator=torch.Generator().manual_seed(5))
        mask_dict = dict(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)
    ref = _official_maskdit(sd, x, t, y_onehot, 4, 2, model.out_channels, mask_dict)
    out = model(x, t, y, ids_keep=ids_keep)
    assert out.sample.shape == ref.shape
    assert (out.sample - ref).abs().max() <= 1e-5 * ref.abs().max()  # fp32 rounding


def test_dit_matches_official_forward_and_block_is_bit_exact():
    model = _randomize(DiT(**TINY))
    sd = model.state_dict()
    x, t, y = _inputs(model)
    ref = _official_dit(sd, x, t, y, 4, model.out_channels)
    assert model(x, t, y).sample.shape == (3, 6, 8, 8)
    assert (model(x, t, y).sample - ref).abs().max() <= 1e-5 * ref.abs().max()
    # with the same attention kernel, the ops' torch back-end is the official math op for op
    tokens, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    assert torch.equal(model.blocks[0](tokens, c, backend="torch"),
                       _official_block(sd, "blocks.0", tokens, c, 4, sdpa=True))
    assert torch.equal(model(x, t, y).sample, _official_dit(sd, x, t, y, 4, model.out_channels, sdpa=True))


# ----------------------------------------------------------------------------------------------
# Official checkpoints

def test_from_official_maskdit_round_trip():
    model = _randomize(MaskDiT(**TINY, **TINY_DEC))
    x, t, y = _inputs(model)
    ids_keep = random_masking_ids(3, model.num_patches, 0.25)[0]
    expected = model(x, t, y, ids_keep=ids_keep).sample
    # EDMPrecond wraps the network as `.model`; training checkpoints hold "ema" and "model"
    official = {"model." + k: v.clone() for k, v in model.state_dict().items()}
    other = {k: torch.zeros_like(v) for k, v in official.items()}
    ckpt = {"ema": official, "model": other, "steps": 7}
    loaded = from_official(ckpt, kind="maskdit", decoder_num_heads=2, num_heads=4)
    assert isinstance(loaded, MaskDiT) and loaded.config == model.config
    assert torch.equal(loaded(x, t, y, ids_keep=ids_keep).sample, expected)
    zero = from_official(ckpt, which="model", decoder_num_heads=2, num_heads=4)
    assert torch.equal(zero(x, t, y).sample, torch.zeros_like(expected))
    # DDP prefix on top; checkpoint trained without the MAE loss has no mask token -> zeros
    ddp = {"module." + k: v for k, v in official.items() if not k.endswith("mask_token")}
    no_token = from_official(ddp, decoder_num_heads=2, num_heads=4)
    assert torch.equal(no_token.mask_token, torch.zeros(1, 1, 16))
    with pytest.raises(KeyError, match="net"):
        from_official(ckpt, which="net", decoder_num_heads=2, num_heads=4)


def test_from_official_infers_preset_heads_and_dit():
    model = _randomize(create_model("MaskDiT-S/4", input_size=16, in_channels=3, num_classes=4, depth=1,
                                    decoder_depth=2))
    loaded = from_official(model.state_dict())
    assert loaded.config == model.config  # heads 6 / 5 from the S preset widths
    dit = _randomize(DiT(**dict(TINY, hidden_size=384, num_heads=6, depth=1)))
    loaded = from_official({"model": dit.state_dict()}, kind="dit")
    assert loaded.config == dit.config and loaded.learn_sigma
    x, t, y = _inputs(dit)
    assert torch.equal(loaded(x, t, y).sample, dit(x, t, y).sample)


def test_from_official_errors():
    sd = MaskDiT(**TINY, **TINY_DEC).state_dict()
    with pytest.raises(ValueError, match="width 32"):
        from_official(sd)  # no preset has width 32: heads must be given
    with pytest.raises(ValueError, match="unsupported"):
        from_official(dict(sd, cls_token=torch.zeros(1, 1, 32)), num_heads=4, decoder_num_heads=2)
    with pytest.raises(ValueError, match="missing"):
        from_official({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="without a decoder"):
        from_official(DiT(**TINY).state_dict(), kind="maskdit", num_heads=4)
    with pytest.raises(ValueError, match="kind"):
        from_official(sd, kind="sit")


# ----------------------------------------------------------------------------------------------
# Errors

def test_clear_errors_for_bad_inputs():
    model = MaskDiT(**TINY, **TINY_DEC)
    dit = DiT(**TINY)
    x, t, y = _inputs(model)
    with pytest.raises(ValueError, match="channels"):
        model(x[:, :2], t, y)
    with pytest.raises(ValueError, match="input_size"):
        model(x[..., :6, :6], t, y)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(x[0], t, y)
    with pytest.raises(ValueError, match="t must"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match="y must have shape"):
        model(x, t, y[:2])
    with pytest.raises(TypeError, match="integer"):
        model(x, t, y.float())
    for bad in (-1, TINY["num_classes"] + 1):
        for m in (model, dit):
            with pytest.raises(ValueError, match="class labels"):
                m(x, t, torch.tensor([0, bad, 1]))
    for ratio in (-0.5, 1.0, 2.0):
        with pytest.raises(ValueError, match="mask_ratio"):
            model(x, t, y, mask_ratio=ratio)
    with pytest.raises(ValueError, match="DiT"):
        dit(x, t, y, mask_ratio=0.5)
    with pytest.raises(ValueError, match="DiT"):
        dit(x, t, y, ids_keep=torch.zeros(3, 4, dtype=torch.long))
    ids = torch.tensor([[0, 1, 2, 3]] * 3)
    with pytest.raises(ValueError, match="outside"):
        model(x, t, y, ids_keep=ids + 13)
    with pytest.raises(ValueError, match="duplicate"):
        model(x, t, y, ids_keep=torch.tensor([[0, 0, 2, 3]] * 3))
    with pytest.raises(TypeError, match="int64"):
        model(x, t, y, ids_keep=ids.int())
    with pytest.raises(ValueError, match="shape"):
        model(x, t, y, ids_keep=ids[:2])
    with pytest.raises(ValueError, match="keeps 4 tokens"):
        model(x, t, y, mask_ratio=0.5, ids_keep=ids)
    # value checks can be turned off (no host sync), shape checks cannot
    quiet = MaskDiT(**TINY, **TINY_DEC, check_inputs=False)
    quiet(x, t, y, ids_keep=ids)
    with pytest.raises(ValueError, match="shape"):
        quiet(x, t, y, ids_keep=ids[:2])
    with pytest.raises(ValueError, match="is on meta"):
        quiet(x, t, y, ids_keep=ids.to("meta"))


def test_clear_errors_for_bad_configs():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("MaskDiT-B/3")
    with pytest.raises(TypeError, match="decoder_depth"):
        create_model("DiT-S/2", decoder_depth=2)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        create_model("DiT-S/8", input_size=12)
    with pytest.raises(ValueError, match="num_heads"):
        MaskDiT(**dict(TINY, num_heads=5), **TINY_DEC)
    with pytest.raises(ValueError, match="num_classes"):
        DiT(**dict(TINY, num_classes=-1))
