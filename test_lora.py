"""Tests for lora.py. A tiny hand-made module with LDM layer names (Linear, 3x3 conv, stride-2 conv,
1x1 conv, upsample conv) covers the layer math; the UNet tests (diffusers interop, SD2.1 counts)
use unet.py. Every parameter is randomised so that zero-init layers cannot make outputs agree."""
import copy
import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora
from lora import (CONV_IN, LoRAConv2d, LoRALinear, companion_path, inject_lora, load_lora, lora_layers,
                  lora_metadata, lora_state_dict, merge_lora, read_metadata, save_lora, unmerge_lora)


# ----------------------------------------------------------------------------------------------
# a tiny module named like the LDM UNet (not a UNet: just the layer kinds LoRA must handle)

class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, d_emb):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(2, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(d_emb, c_out))
        self.out_layers = nn.Sequential(nn.GroupNorm(2, c_out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip_connection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb, context):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, d, d_ctx):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d, bias=False), nn.Linear(d_ctx, d, bias=False), \
            nn.Linear(d_ctx, d, bias=False)
        self.to_out = nn.Sequential(nn.Linear(d, d), nn.Dropout(0.0))

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(F.scaled_dot_product_attention(q, k, v))


class GEGLU(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.proj = nn.Linear(d, 2 * d_ff)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class Transformer(nn.Module):  # SpatialTransformer with one BasicTransformerBlock, SD2-style linear proj
    def __init__(self, c, d_ctx):
        super().__init__()
        self.norm = nn.GroupNorm(2, c)
        self.proj_in = nn.Linear(c, c)
        block = nn.Module()
        block.norm1, block.norm2, block.norm3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        block.attn1, block.attn2 = Attention(c, c), Attention(c, d_ctx)
        block.ff = nn.Module()
        block.ff.net = nn.Sequential(GEGLU(c, 2 * c), nn.Dropout(0.0), nn.Linear(2 * c, c))
        self.transformer_blocks = nn.ModuleList([block])
        self.proj_out = nn.Linear(c, c)

    def forward(self, x, emb, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        for b in self.transformer_blocks:
            h = b.attn1(b.norm1(h), b.norm1(h)) + h
            h = b.attn2(b.norm2(h), context) + h
            h = b.ff.net(b.norm3(h)) + h
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x, emb, context):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb, context):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Step(nn.Sequential):
    def forward(self, x, emb, context):
        for layer in self:
            x = layer(x) if isinstance(layer, nn.Conv2d) else layer(x, emb, context)
        return x


class TinyLDM(nn.Module):
    """x (B, c_in, 8, 8), emb (B, 8), context (B, 5, 12) -> (B, 4, 8, 8)."""

    def __init__(self, c_in=4, c=8, d_emb=8, d_ctx=12):
        super().__init__()
        self.input_blocks = nn.ModuleList([Step(nn.Conv2d(c_in, c, 3, padding=1)),
                                           Step(ResBlock(c, 2 * c, d_emb), Transformer(2 * c, d_ctx)),
                                           Step(Downsample(2 * c))])
        self.middle_block = Step(ResBlock(2 * c, 2 * c, d_emb), Transformer(2 * c, d_ctx))
        self.output_blocks = nn.ModuleList([Step(ResBlock(4 * c, 2 * c, d_emb), Upsample(2 * c)),
                                            Step(ResBlock(4 * c, c, d_emb))])
        self.out = nn.Sequential(nn.GroupNorm(2, c), nn.SiLU(), nn.Conv2d(c, 4, 3, padding=1))

    def forward(self, x, emb, context):
        hs = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            hs.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = block(torch.cat([x, hs.pop()], dim=1), emb, context)
        return self.out(x)


# the paths lora.TARGETS must pick out of TinyLDM, written out by hand
EXPECTED = {
    "conv": ["input_blocks.1.0.in_layers.2", "input_blocks.1.0.out_layers.3", "input_blocks.1.0.skip_connection",
             "input_blocks.2.0.op", "middle_block.0.in_layers.2", "middle_block.0.out_layers.3",
             "output_blocks.0.0.in_layers.2", "output_blocks.0.0.out_layers.3", "output_blocks.0.0.skip_connection",
             "output_blocks.0.1.conv", "output_blocks.1.0.in_layers.2", "output_blocks.1.0.out_layers.3",
             "output_blocks.1.0.skip_connection"],
    "attn": [f"{t}.transformer_blocks.0.attn{i}.to_{x}" for t in ("input_blocks.1.1", "middle_block.1")
             for i in (1, 2) for x in "qkv"],
    "attn_out": [f"{t}.transformer_blocks.0.attn{i}.to_out.0" for t in ("input_blocks.1.1", "middle_block.1")
                 for i in (1, 2)],
    "ff": [f"{t}.transformer_blocks.0.ff.net.{j}" for t in ("input_blocks.1.1", "middle_block.1")
           for j in ("0.proj", "2")],
    "proj": [f"{t}.{p}" for t in ("input_blocks.1.1", "middle_block.1") for p in ("proj_in", "proj_out")],
}


def randomize(module, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def randomize_lora(model, seed, std=0.3):
    """Non-zero up weights (as after training) so the LoRA branch matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * std)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)


def inputs(seed=0, c_in=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, c_in, 8, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(2, 5, 12, generator=g)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny(seed=0, **kw):
    return randomize(TinyLDM(**kw), seed)


# ----------------------------------------------------------------------------------------------
# layers, injection, training

def test_targets_pick_exactly_the_ldm_layers():
    for group, expected in EXPECTED.items():
        model = tiny()
        names = inject_lora(model, 2, targets=(group,))
        assert sorted(names) == sorted(expected), group
    model = tiny()
    names = inject_lora(model, 2)  # default: conv, attn, ff, proj; never conv_in / conv_out / emb
    assert sorted(names) == sorted(sum((EXPECTED[g] for g in lora.DEFAULT_TARGETS), []))
    assert CONV_IN not in names and "out.2" not in names
    assert all(isinstance(m, LoRAConv2d if isinstance(m, nn.Conv2d) else LoRALinear) for _, m in lora_layers(model))


def test_rank_int_and_fraction():
    model = tiny()
    inject_lora(model, 0.3, targets=("conv", "attn"))
    for name, m in lora_layers(model):
        if isinstance(m, nn.Conv2d):
            n_in, n_out = m.in_channels, m.out_channels
        else:
            n_in, n_out = m.in_features, m.out_features
        assert m.rank == math.ceil(0.3 * max(n_in, n_out)), name
        assert m.scale == 1.0  # alpha defaults to the layer's rank
    assert {m.rank for _, m in lora_layers(model)} == {3, 5, 10}  # widths 8 -> 3, 16 -> 5, 32 -> 10
    model = tiny()
    inject_lora(model, 3, alpha=6.0)
    assert {(m.rank, m.scale) for _, m in lora_layers(model)} == {(3, 2.0)}
    for bad in (0, -1, 1.5, 0.0, True, "8"):
        with pytest.raises(ValueError, match="rank"):
            inject_lora(tiny(), bad)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        inject_lora(tiny(), 2, targets=("conv", "mlp"))
    with pytest.raises(ValueError, match="not found"):
        inject_lora(tiny(), 2, full_train=("conv_in",))
    model = tiny()
    inject_lora(model, 2)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, 2)


def test_zero_init_identical_and_only_lora_moves():
    model = tiny()
    x, emb, ctx = inputs()
    ref = model(x, emb, ctx)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, 3, full_train=(CONV_IN,))
    assert torch.equal(model(x, emb, ctx), ref)  # B = 0: bit-identical

    # base names unchanged; the only new keys are the LoRA children
    sd = model.state_dict()
    assert set(base_sd) <= set(sd)
    assert all(".lora_down." in k or ".lora_up." in k for k in set(sd) - set(base_sd))
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not unexpected and all(".lora_" in k for k in missing)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert trainable == {f"{n}.lora_{s}.weight" for n, _ in lora_layers(model) for s in ("down", "up")} | \
        {f"{CONV_IN}.weight", f"{CONV_IN}.bias"}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn_like(ref)
    for _ in range(3):
        loss = F.mse_loss(model(x, emb, ctx), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k, v in base_sd.items():  # frozen base weights did not move, full-trained conv_in did
        assert torch.equal(after[k], v) == (not k.startswith(CONV_IN)), k
    assert all(m.lora_up.weight.abs().max() > 0 for _, m in lora_layers(model))
    assert not torch.equal(model(x, emb, ctx), ref)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("conv", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1),
                                  dict(kernel_size=3, padding=1)])
def test_conv_lora_matches_closed_form(conv, fold):
    """Stride-2 downsampling, 1x1 and 3x3 convs, both forms of the forward pass: the LoRA layer equals
    one conv with W + (alpha/r) up @ down (the composition of a k x k and a 1 x 1 conv is a k x k conv)."""
    base = randomize(nn.Conv2d(6, 10, **conv), 1)
    layer = LoRAConv2d(base, rank=4, alpha=3.0)
    layer.fold = fold
    randomize_lora(nn.ModuleDict({"l": layer}), 2)
    x = torch.randn(2, 6, 9, 9)
    dW = 0.75 * torch.einsum("or,rikl->oikl", layer.lora_up.weight[:, :, 0, 0], layer.lora_down.weight)
    want = F.conv2d(x, base.weight + dW, base.bias, base.stride, base.padding)
    got = layer(x)
    assert got.shape == base(x).shape
    assert rel(got, want) < 1e-5
    assert layer.weight is base.weight and layer.bias is base.bias  # shares, does not copy


@pytest.mark.parametrize("fold", [False, True])
def test_linear_lora_matches_closed_form(fold):
    base = randomize(nn.Linear(7, 5), 1)
    layer = LoRALinear(base, rank=3, alpha=6.0, dropout=0.5).eval()  # dropout off in eval
    layer.fold = fold
    randomize_lora(nn.ModuleDict({"l": layer}), 2)
    x = torch.randn(4, 7)
    want = x @ (base.weight + 2.0 * layer.lora_up.weight @ layer.lora_down.weight).T + base.bias
    assert rel(layer(x), want) < 1e-6


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_folded_forward_trains_the_same(kind):
    """Folding the update into W must give the branch's gradients: for down, up and the input, while
    the frozen base weight gets none."""
    if kind == "linear":
        base, x0, make = nn.Linear(7, 5), torch.randn(4, 6, 7), LoRALinear
    else:
        base, x0, make = nn.Conv2d(7, 5, 3, stride=2, padding=1), torch.randn(2, 7, 9, 9), LoRAConv2d
    randomize(base, 1).requires_grad_(False)
    grads = []
    for fold in (False, True):
        layer = make(base, rank=3, alpha=6.0)
        layer.fold = fold
        randomize_lora(nn.ModuleDict({"l": layer}), 2)
        x = x0.clone().requires_grad_(True)
        (layer(x) ** 2).sum().backward()
        assert base.weight.grad is None
        grads.append([layer.lora_down.weight.grad, layer.lora_up.weight.grad, x.grad])
    for branch, folded in zip(*grads):
        assert rel(folded, branch) < 1e-5


def test_fold_is_chosen_where_cheaper():
    """The tiny prior at rank 64 (widths 32-64, 24x32 latents, batch 8) folds; SD's 320-wide top level
    at rank 64 and its 8x8 bottom at rank 4 keep the branch (the cost model in LoRALayer)."""
    def choice(c, rank, hw, batch=8, grad=True):
        layer = LoRAConv2d(nn.Conv2d(c, c, 3, padding=1), rank=rank)
        with torch.set_grad_enabled(grad):
            return layer._fold_is_cheaper(torch.empty(batch, c, *hw, device="meta"))
    assert choice(64, 64, (24, 32))
    assert not choice(320, 64, (48, 64), batch=2)
    assert not choice(1280, 4, (8, 8), batch=2)
    assert choice(320, 4, (48, 64), batch=2, grad=False)  # inference: forming W costs less than the branch
    dropout = LoRALinear(nn.Linear(64, 64), rank=64, dropout=0.1).train()
    assert not dropout._fold_is_cheaper(torch.empty(8, 768, 64))  # dropout acts on the branch only


def test_merge_unmerge_exact():
    model = tiny()
    inject_lora(model, 3, alpha=5.0, targets=tuple(lora.TARGETS))
    randomize_lora(model, 1)
    x, emb, ctx = inputs()
    out = model(x, emb, ctx)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)
    merged = model(x, emb, ctx)
    assert rel(merged, out) < 1e-5
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(f"{n}.weight" for n, _ in lora_layers(model))
    unmerge_lora(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bit-exact
    assert torch.equal(model(x, emb, ctx), out)


def test_merge_without_copy_for_inference():
    # sample.py merges without keeping copies: the same weights as a kept-copy merge, and unmerging
    # it is refused with a clear error instead of silently leaving the LoRA in
    model = tiny()
    inject_lora(model, 3, alpha=5.0, targets=tuple(lora.TARGETS))
    randomize_lora(model, 1)
    twin = copy.deepcopy(model)
    merge_lora(model, keep_copy=False)
    merge_lora(twin)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(m.weight_before_merge is None for _, m in lora_layers(model))
    with pytest.raises(RuntimeError, match="keep_copy=False"):
        unmerge_lora(model)


def test_lora_stays_fp32_under_bf16():
    # bf16 autocast on an fp32 base
    model = tiny()
    inject_lora(model, 3)
    randomize_lora(model, 1, std=0.1)
    x, emb, ctx = inputs()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, emb, ctx)
        loss = out.float().square().mean()
    loss.backward()
    opt.step()
    for _, m in lora_layers(model):
        for p in (m.lora_down.weight, m.lora_up.weight):
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()

    # a bf16 base (frozen weights stored in bf16) without autocast: LoRA still fp32, output bf16
    model = tiny().to(torch.bfloat16)
    inject_lora(model, 3)
    randomize_lora(model, 1, std=0.1)
    assert all(m.lora_up.weight.dtype == torch.float32 for _, m in lora_layers(model))
    out16 = model(x.bfloat16(), emb.bfloat16(), ctx.bfloat16())
    assert out16.dtype == torch.bfloat16
    ref = copy.deepcopy(model).float()  # same numbers, all fp32
    assert rel(out16.float(), ref(x, emb, ctx)) < 0.05  # bf16 rounding only


# ----------------------------------------------------------------------------------------------
# files

META = lora_metadata("sd2", "v", task="depth", objective="diff2flow", zero_snr=True)


def trained(seed=0, c_in=4, rank=3, full_train=(CONV_IN,)):
    """A tiny model with LoRA and a 'trained' (randomised) up/down and input conv."""
    model = tiny(seed, c_in=c_in)
    inject_lora(model, rank, alpha=2.0, full_train=full_train)
    randomize_lora(model, seed + 1)
    if full_train:
        randomize(model.get_submodule(CONV_IN), seed + 2)
    return model


def test_save_load_roundtrip(tmp_path):
    model = trained()
    x, emb, ctx = inputs()
    out = model(x, emb, ctx)
    path = tmp_path / "depth.safetensors"
    meta = save_lora(path, model, META)
    assert os.path.exists(companion_path(path)) and companion_path(path).endswith("depth.full.safetensors")

    # the LoRA file holds kohya keys only; the companion file the fully trained input conv
    keys = set(load_file(path))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_input_blocks_2_0_op.lora_up.weight" in keys
    assert set(load_file(companion_path(path))) == {f"{CONV_IN}.weight", f"{CONV_IN}.bias"}

    fresh = tiny()  # same base weights, no LoRA
    read_meta = load_lora(path, fresh)
    assert torch.equal(fresh(x, emb, ctx), out)
    assert read_meta == meta
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(lora_state_dict(model))

    # loading into a model that already has LoRA layers (resume) fills them in place
    again = tiny()
    inject_lora(again, 3, full_train=(CONV_IN,))
    load_lora(path, again)
    assert torch.equal(again(x, emb, ctx), out)

    assert read_metadata(path) == meta

    # full finetuning (no LoRA layers): an empty LoRA file, every weight in the companion file
    full = tiny(5)
    full.requires_grad_(True)
    save_lora(tmp_path / "full.safetensors", full, META)
    assert not load_file(tmp_path / "full.safetensors")
    fresh = tiny()
    load_lora(tmp_path / "full.safetensors", fresh)
    assert torch.equal(fresh(x, emb, ctx), full(x, emb, ctx))

    # saving without fully trained parameters removes the stale companion file
    plain = tiny()
    inject_lora(plain, 2)
    save_lora(path, plain)
    assert not os.path.exists(companion_path(path))


def test_metadata(tmp_path):
    model = trained()
    path = tmp_path / "m.safetensors"
    save_lora(path, model, META)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "3" and float(meta["ss_network_alpha"]) == 2.0
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert meta["ss_zero_terminal_snr"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["diff2flow.task"] == "depth" and meta["diff2flow.objective"] == "diff2flow"
    assert meta["diff2flow.prediction_type"] == "v" and meta["diff2flow.zero_snr"] == "True"
    assert meta["diff2flow.unet_in_channels"] == "4"
    assert meta["diff2flow.targets"] == "attn,conv,ff,proj" and meta["diff2flow.rank"] == "3"
    assert lora_metadata("sd1", "eps")["ss_base_model_version"] == "sd_v1"
    assert lora_metadata("sd1", "eps")["modelspec.architecture"] == "stable-diffusion-v1/lora"

    # A1111's addnet hash: sha256 over the file's tensor bytes (everything after the JSON header),
    # recomputed here from the file itself
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    json.loads(raw[8:8 + n])  # the header is where we think it is
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    # the hash depends on the tensors, not on non-ss metadata
    other = save_lora(tmp_path / "o.safetensors", model, {**META, "diff2flow.task": "t2i"})
    assert other["sshs_model_hash"] == meta["sshs_model_hash"]
    randomize_lora(model, 9)
    assert save_lora(tmp_path / "p.safetensors", model, META)["sshs_model_hash"] != meta["sshs_model_hash"]


def apply_kohya_file(base_sd, path):
    """An independent reader, as other tools do it: W += (alpha/r) * up @ down for every module in the
    file (module path recovered from the base state dict), then the companion file's tensors."""
    sd = {k: v.clone() for k, v in base_sd.items()}
    names = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in sd if k.endswith(".weight")}
    lora_sd = load_file(path)
    stems = {k.split(".")[0] for k in lora_sd}
    for stem in stems:
        down, up = lora_sd[stem + ".lora_down.weight"], lora_sd[stem + ".lora_up.weight"]
        r = down.shape[0]
        scale = lora_sd[stem + ".alpha"].item() / r
        w = names[stem]
        sd[w] = sd[w] + scale * (up.flatten(1) @ down.flatten(1)).reshape(sd[w].shape)
    if os.path.exists(str(path).replace(".safetensors", ".full.safetensors")):
        sd.update(load_file(str(path).replace(".safetensors", ".full.safetensors")))
    return sd


def test_independent_reader_matches(tmp_path):
    model = trained()
    x, emb, ctx = inputs()
    out = model(x, emb, ctx)
    path = tmp_path / "l.safetensors"
    save_lora(path, model, META)
    plain = tiny()  # no lora.py classes involved from here on
    plain.load_state_dict(apply_kohya_file(plain.state_dict(), path))
    err = rel(plain(x, emb, ctx), out)
    print(f"independent reader vs LoRA model: rel err {err:.2e}")
    assert err < 1e-5


def test_bad_files(tmp_path):
    x, emb, ctx = inputs()
    path = tmp_path / "l.safetensors"
    save_lora(path, trained(), META)

    # another base: wider layers -> shape mismatch naming the module, and the model is left untouched
    other = tiny(c=16)
    with pytest.raises(ValueError, match=r"lora_unet_\w+ has down .* but layer [\w.]+ needs .*another base"):
        load_lora(path, other)
    assert not lora_layers(other)

    # keys for modules that do not exist
    sd = load_file(path)
    sd["lora_unet_input_blocks_7_0_op.lora_down.weight"] = sd.pop("lora_unet_input_blocks_2_0_op.lora_down.weight")
    sd["lora_unet_input_blocks_7_0_op.lora_up.weight"] = sd.pop("lora_unet_input_blocks_2_0_op.lora_up.weight")
    sd["lora_unet_input_blocks_7_0_op.alpha"] = sd.pop("lora_unet_input_blocks_2_0_op.alpha")
    save_file(sd, tmp_path / "ghost.safetensors")
    with pytest.raises(ValueError, match="do not exist in this model.*lora_unet_input_blocks_7_0_op"):
        load_lora(tmp_path / "ghost.safetensors", tiny())
    sd["lora_unet_input_blocks_7_0_op.scale"] = torch.ones(())
    save_file(sd, tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match="not kohya LoRA keys.*_op.scale"):
        load_lora(tmp_path / "odd.safetensors", tiny())

    # a depth LoRA (input conv widened to 8 channels, trained in full) on a 4-channel base
    wide = tmp_path / "depth.safetensors"
    save_lora(wide, trained(c_in=8), META)
    with pytest.raises(ValueError, match=r"8 input channels \(task depth\), the model has 4"):
        load_lora(wide, tiny())
    # without our metadata, the companion file's shape check names the tensor
    save_file(load_file(wide), wide)
    with pytest.raises(ValueError, match=r"input_blocks.0.0.weight has shape \(8, 8, 3, 3\)"):
        load_lora(wide, tiny())
    load_lora(wide, tiny(c_in=8))  # the right base loads

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora(tmp_path / "nope.safetensors", tiny())


# ----------------------------------------------------------------------------------------------
# with the real UNet (unet.py): diffusers interop, widened input conv, SD2.1 parameter counts

def tiny_unet_config(use_linear):
    from unet import UNetConfig
    # SD's layout in miniature: attention at every level but the last, so the first up level has no
    # attention (its Upsample sits at output_blocks.N.1, as SD's output_blocks.2.1.conv)
    return UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                      context_dim=24, num_heads=-1 if use_linear else 2, num_head_channels=16 if use_linear else -1,
                      use_linear_in_transformer=use_linear)


def tiny_unet(use_linear=True, seed=0):
    from unet import UNetModel
    return randomize(UNetModel(tiny_unet_config(use_linear)), seed, std=0.1)


def unet_inputs(seed=0, c_in=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, c_in, 8, 8, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 24, generator=g)


@pytest.mark.parametrize("use_linear", [True, False], ids=["sd2-linear-proj", "sd1-conv-proj"])
def test_diffusers_loads_our_lora(tmp_path, use_linear):
    """diffusers' own LDM->diffusers UNet converter and its kohya LoRA loader read our file (LDM-path
    names) into a UNet2DConditionModel whose output then matches ours: conv LoRAs on ResBlock 3x3
    convs, 1x1 skip convs and the stride-2 downsample conv included, all attention/ff/proj targets."""
    import re
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)
    cfg = tiny_unet_config(use_linear)
    unet = tiny_unet(use_linear)
    ckpt = {"model.diffusion_model." + k: v.clone() for k, v in unet.state_dict().items()}
    ldm_params = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=list(cfg.channel_mult),
                      num_res_blocks=1, attention_resolutions=[1], transformer_depth=1, context_dim=24,
                      use_linear_in_transformer=use_linear,
                      **({"num_head_channels": 16} if use_linear else {"num_heads": 2}))
    original_config = {"model": {"params": {"unet_config": {"params": ldm_params},
                                            "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    dcfg = create_unet_diffusers_config_from_ldm(original_config, ckpt)
    dunet = UNet2DConditionModel(**dcfg)
    dunet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dcfg), strict=True)
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        base_out = unet(x, t, ctx)
        assert rel(dunet(x, t, encoder_hidden_states=ctx).sample, base_out) < 1e-5  # same base

    names = inject_lora(unet, 3, alpha=2.0, targets=tuple(lora.TARGETS))
    assert {"input_blocks.2.0.op", "input_blocks.3.0.skip_connection", "input_blocks.1.0.in_layers.2"} <= set(names)
    randomize_lora(unet, 1, std=0.1)
    # diffusers 0.42 maps kohya LDM names by block position and sends the Upsample conv of an
    # attention-free up level (here output_blocks.1.1.conv, in SD output_blocks.2.1.conv) to a
    # non-existent `attentions` module, dropping it with an "unexpected keys" warning. ComfyUI and
    # A1111 apply it. Zero that one so the comparison covers everything diffusers can place.
    dropped = [n for n in names if re.fullmatch(r"output_blocks\.\d+\.1\.conv", n)]
    assert dropped == ["output_blocks.1.1.conv"]
    with torch.no_grad():
        unet.get_submodule(dropped[0]).lora_up.weight.zero_()
    path = tmp_path / "l.safetensors"
    save_lora(path, unet, lora_metadata("sd2" if use_linear else "sd1", "v" if use_linear else "eps"))

    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(load_file(path), unet_config=dunet.config)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, dunet)
    with torch.no_grad():
        ours = unet(x, t, ctx)
        theirs = dunet(x, t, encoder_hidden_states=ctx).sample
    err, effect = rel(theirs, ours), rel(ours, base_out)
    print(f"diffusers vs ours ({'linear' if use_linear else 'conv'} proj): rel err {err:.2e}, LoRA effect {effect:.2e}")
    assert effect > 1e-2  # the LoRA changes the output, so agreement means something
    assert err < 1e-4


def test_depth_lora_on_unet(tmp_path):
    """A depth-style LoRA: input conv widened to 8 channels and trained in full, LoRA elsewhere.
    Round trip through the two files; refused by name on a 4-channel base."""
    from unet import widen_input_conv
    unet = widen_input_conv(tiny_unet(), 8)
    inject_lora(unet, 4, full_train=(CONV_IN, "out.2"))
    randomize_lora(unet, 1, std=0.1)
    randomize(unet.get_submodule(CONV_IN), 2, std=0.1)
    x, t, ctx = unet_inputs(c_in=8)
    with torch.no_grad():
        out = unet(x, t, ctx)
    path = tmp_path / "depth.safetensors"
    save_lora(path, unet, lora_metadata("sd2", "v", task="depth", objective="diff2flow", zero_snr=True))
    assert set(load_file(companion_path(path))) == {"input_blocks.0.0.weight", "input_blocks.0.0.bias",
                                                    "out.2.weight", "out.2.bias"}
    with pytest.raises(ValueError, match=r"8 input channels \(task depth\), the model has 4.*input_blocks.0.0"):
        load_lora(path, tiny_unet())
    fresh = widen_input_conv(tiny_unet(), 8)
    load_lora(path, fresh)
    plain = widen_input_conv(tiny_unet(), 8)  # what other tools do: W + (alpha/r) up down, no lora.py
    plain.load_state_dict(apply_kohya_file(plain.state_dict(), path))
    with torch.no_grad():
        assert torch.equal(fresh(x, t, ctx), out)
        err = rel(plain(x, t, ctx), out)
    print(f"independent reader vs LoRA UNet: rel err {err:.2e}")
    assert err < 1e-5


def test_sd21_trainable_parameter_counts():
    """The full SD2.1 UNet on the meta device (no memory): LoRA sizes of the paper's two setups.
    The count is checked against a closed form written here from the base layers' shapes:
    a LoRA of rank r on a layer with fan-in n_in (in * k * k for a conv) and n_out outputs has
    r * (n_in + n_out) parameters."""
    from unet import UNetConfig, UNetModel

    def sd21():
        with torch.device("meta"):
            return UNetModel(UNetConfig(context_dim=1024, num_heads=-1, num_head_channels=64,
                                        use_linear_in_transformer=True))

    base = sd21()
    assert sum(p.numel() for p in base.parameters()) == 865_910_724
    patterns = {"conv": r".*\.(in_layers\.2|out_layers\.3|skip_connection|op|conv)",
                "attn": r".*\.attn[12]\.to_[qkv]", "attn_out": r".*\.to_out\.0",
                "ff": r".*\.ff\.net\.(0\.proj|2)", "proj": r".*\.proj_(in|out)"}

    def closed_form(rank, targets):
        import re
        total = 0
        for name, m in base.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)) or \
                    not any(re.fullmatch(patterns[t], name) for t in targets):
                continue
            n_in = m.weight[0].numel()  # in * k * k
            n_out = m.weight.shape[0]
            width = max(m.weight.shape[:2])
            r = rank if isinstance(rank, int) else math.ceil(rank * width)
            total += r * (n_in + n_out)
        return total

    # (setup, rank, targets, DESIGN.md's figure in M, the paper's figure in M)
    rows = [("paper small", 64, ("conv", "attn", "ff", "proj"), "61.5", "62"),
            ("small + to_out", 64, ("conv", "attn", "attn_out", "ff", "proj"), "64.7", None),
            ("paper base", 0.2, ("conv", "attn"), "207", "222"),
            ("base + to_out + proj", 0.2, ("conv", "attn", "attn_out", "proj"), "227", None)]
    for label, rank, targets, design, paper in rows:
        unet = sd21()
        inject_lora(unet, rank, targets=targets)
        n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        print(f"SD2.1 LoRA {label:21s} rank {rank:<4} {'+'.join(targets):27s}: {n:,} trainable "
              f"({n / 1e6:.1f} M" + (f"; paper {paper} M)" if paper else ")"))
        assert n == closed_form(rank, targets)
        decimals = len(design.partition(".")[2])
        assert f"{n / 1e6:.{decimals}f}" == design
    unet = sd21()
    inject_lora(unet, 64, full_train=(CONV_IN, "out.2"))  # + input and last conv in full (4 channels)
    n_full = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert n_full - closed_form(64, ("conv", "attn", "ff", "proj")) == 320 * 4 * 9 + 320 + 4 * 320 * 9 + 4
