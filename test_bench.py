"""Tests for bench.py and the speed work it checks: the benchmark compares like with like (same
weights, same LoRA layers, same function on both sides), FLOPs are counted right, frozen weights get
no gradients, and the UNet forward (with LoRA) compiles as ONE graph (no torch.compile graph breaks).
Micro configurations of both layouts, every parameter randomised; seconds on a CPU."""
from dataclasses import replace

import pytest
import torch

import bench
from bench import BenchConfig
from lora import TARGETS, inject_lora, lora_layers
from unet import SD2_UNET, UNetConfig, UNetModel
from vae import VAEConfig

MICRO_UNET = {
    # SD2 layout: Linear proj_in/out, a fixed head width
    "sd2": UNetConfig(in_channels=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                      context_dim=32, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True),
    # SD1 layout: 1x1 conv proj_in/out, a fixed head count
    "sd1": UNetConfig(in_channels=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                      context_dim=48, num_heads=2, num_head_channels=-1, use_linear_in_transformer=False),
}


def micro(layout="sd2", **kw):
    return BenchConfig(unet=MICRO_UNET[layout], vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
                       batch=2, latent=(8, 8), rank=4, repeats=1, warmup=0, context_len=7, **kw)


def pair(bc, lora=True):
    sd = bench.random_ldm_weights(bc, seed=1)
    ours, ours_vae = bench.build_ours(bc, sd, "cpu")
    theirs, theirs_vae = bench.build_theirs(bc, sd, "cpu")
    if lora:
        bench.add_lora_ours(ours, bc)
        bench.add_lora_theirs(theirs, bc)
    return ours, ours_vae, theirs, theirs_vae


@pytest.mark.parametrize("layout", ["sd2", "sd1"])
def test_both_sides_compute_the_same_function(layout):
    """diffusers' converters give the same UNet and VAE; peft's LoRA, filled with ours, the same LoRA UNet."""
    bc = micro(layout)
    ours, ours_vae, theirs, theirs_vae = pair(bc, lora=False)
    b = bench.make_inputs(bc, "cpu")
    ac = bench.autocast_for(bc, "cpu")
    out_o = bench.depth_inference(ours, ours_vae, b, ac)
    out_t = bench.depth_inference(bench.TheirUNet(theirs), bench.TheirVAE(theirs_vae), b, ac)
    assert out_o.shape == b["rgb"].shape
    assert bench.rel_err(out_o, out_t) < 1e-5

    with torch.no_grad():
        base = ours(b["x"], b["t"], b["context"])
    bench.add_lora_ours(ours, bc)
    bench.add_lora_theirs(theirs, bc)
    bench.copy_lora(ours, theirs, seed=3)
    with torch.no_grad():
        o = ours(b["x"], b["t"], b["context"])
        t = bench.TheirUNet(theirs)(b["x"], b["t"], b["context"])
    assert bench.rel_err(o, base) > 1e-2  # the LoRA does change the output: the next check is not vacuous
    assert bench.rel_err(o, t) < 1e-5


@pytest.mark.parametrize("group", list(TARGETS))
def test_diffusers_target_names_pick_the_same_layers(group):
    """Each lora.TARGETS group maps to the same layers in diffusers: same trainable count, and every
    LoRA layer of ours has a LoRA twin in theirs (copy_lora raises otherwise)."""
    bc = micro("sd2")
    sd = bench.random_ldm_weights(bc, seed=1)
    ours, _ = bench.build_ours(bc, sd, "cpu")
    theirs, _ = bench.build_theirs(bc, sd, "cpu")
    inject_lora(ours, bc.rank, targets=(group,))
    from peft import LoraConfig
    theirs.add_adapter(LoraConfig(r=bc.rank, lora_alpha=bc.rank, target_modules=list(bench.DIFFUSERS_TARGETS[group])))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count(ours) == count(theirs) > 0
    bench.copy_lora(ours, theirs)
    n_theirs = sum(1 for _, m in theirs.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    assert len(lora_layers(ours)) == n_theirs


def test_trainable_counts_match_on_full_sd21():
    """The benchmark's LoRA on the full SD2.1 UNet (meta device: no memory) has the same trainable
    count on both sides, and the LoRA part the size DESIGN.md documents (rank 64 on convs, q/k/v, ff,
    proj: 61.5 M)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    bc = bench.CONFIGS["medium"]
    with torch.device("meta"):
        ours = UNetModel(bc.unet)
        theirs = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(bench.ldm_original_config(bc), {}))
    bench.add_lora_ours(ours, bc)
    bench.add_lora_theirs(theirs, bc)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count(ours) == count(theirs)
    lora_only = sum(p.numel() for _, m in lora_layers(ours) for p in (m.lora_down.weight, m.lora_up.weight))
    assert round(lora_only / 1e6, 1) == 61.5


def test_flops_sd21_forward_and_frozen_backward():
    """torch's FLOP counter (with the CPU attention kernel added) gives the SD2.1 UNet at 48x64 latents
    581 GFLOPs per forward (attention included: ~70 of them). The LoRA step's backward costs about one
    forward, because frozen weights get no weight gradients; a full finetune's costs about two."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    bc = replace(bench.CONFIGS["sd21"], unet=SD2_UNET, batch=1)
    assert abs(bench.count_flops(bc, "forward") / 1e9 - 581.2) < 0.5

    bc = micro("sd2")
    fwd, lora_step = bench.count_flops(bc, "forward"), bench.count_flops(bc, "train")
    with FakeTensorMode():
        unet = UNetModel(bc.unet)  # every weight trained
        x, t, c = torch.empty(2, 8, 8, 8), torch.empty(2), torch.empty(2, 7, 32)
        with FlopCounterMode(display=False, custom_mapping=bench.CPU_SDPA_FLOPS) as counter:
            unet(x, t, c).square().mean().backward()
    full_step = counter.get_total_flops()
    assert 2.0 * fwd < lora_step < 2.4 * fwd
    assert 2.9 * fwd < full_step < 3.1 * fwd


def test_frozen_weights_get_no_gradients():
    bc = micro("sd2")
    ours, *_ = pair(bc)
    b = bench.make_inputs(bc, "cpu")
    out = ours(b["x"], b["t"], b["context"])
    out.square().mean().backward()
    frozen = [n for n, p in ours.named_parameters() if not p.requires_grad]
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert frozen and trained
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    assert all(".lora_" in n or n.startswith(bench.FULL_TRAIN) for n in trained)


@pytest.mark.parametrize("attn_fp32,use_checkpoint,bf16", [(False, False, False), (True, True, True)])
def test_unet_with_lora_compiles_without_graph_breaks(attn_fp32, use_checkpoint, bf16):
    """torch.compile sees the whole UNet + LoRA forward as one graph: dynamo traces it (no inductor
    compile, so seconds) and reports zero graph breaks, also with fp32 attention, gradient
    checkpointing and bf16 autocast."""
    cfg = replace(MICRO_UNET["sd2"], attn_fp32=attn_fp32, use_checkpoint=use_checkpoint)
    unet = UNetModel(cfg)
    inject_lora(unet, 4, full_train=bench.FULL_TRAIN)
    x, t, c = torch.randn(2, 8, 8, 8), torch.rand(2) * 999, torch.randn(2, 7, 32)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        explanation = torch._dynamo.explain(unet)(x, t, c)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_interleaved_alternates_and_takes_medians(monkeypatch):
    calls = []
    walls = iter([5.0, 1.0, 2.0, 9.0, 3.0, 4.0])  # fake durations, consumed by the fns in call order
    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(bench.time, "process_time", lambda: clock["cpu"])

    def fn(name):
        def run():
            calls.append(name)
            dt = next(walls)
            clock["wall"] += dt
            clock["cpu"] += dt / 2  # half the time on the CPU, the rest waiting
        return run
    med = bench.interleaved({"a": fn("a"), "b": fn("b")}, repeats=3, warmup=0, sync=lambda: None)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert med["a"]["all"] == [5.0, 9.0, 3.0] and med["b"]["all"] == [1.0, 2.0, 4.0]
    assert (med["a"]["wall"], med["b"]["wall"]) == (5.0, 2.0)
    assert (med["a"]["cpu"], med["b"]["cpu"]) == (2.5, 1.0)


def test_sd21_needs_a_gpu(capsys):
    assert bench.main(["--config", "sd21"]) is None
    assert "needs a GPU" in capsys.readouterr().out
