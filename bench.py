"""
bench.py: this project's UNet + LoRA against diffusers' UNet2DConditionModel + peft, side by side.

    python bench.py --config tiny                   # seconds (CPU)
    python bench.py --config medium                 # minutes on 2 CPU cores: the full SD2.1 UNet
    python bench.py --config sd21 --device cuda --peak-tflops 989   # a GPU: H100/H200 dense bf16 peak
                                                    # (training eager and torch.compile'd; inference eager)

What is measured, for ours and theirs at the same configuration:
  train   one LoRA training step: forward, MSE loss, backward, AdamW step, zero_grad
  infer   2-step depth inference end to end: VAE encode of the image, 2 Euler steps of Diff2Flow
          (2 UNet calls on [x, image latent]), VAE decode
  memory  the peak memory of training steps (see peak_memory below for how)
Times are medians over repeats run in ONE process, interleaved (ours, theirs, theirs, ours, ...: the
side that goes first alternates), so a background load on the machine slows both sides alike and
the ratio ours/theirs stays fair even when the absolute times move.

Same model on both sides: our UNet and VAE get random weights (every bias and norm perturbed too),
their LDM state dicts go through diffusers' OWN converters (diffusers.loaders.single_file_utils) into
UNet2DConditionModel / AutoencoderKL, and the outputs are checked to agree before anything is timed.
LoRA goes on the same layers with the same rank (ours: lora.inject_lora; theirs: peft through
unet.add_adapter), our LoRA weights are copied into peft's, and the trainable parameter counts and the
LoRA outputs must agree too. Inference runs the base models (a LoRA merged for inference costs the same).

FLOPs are counted with torch.utils.flop_counter on fake tensors (shapes only: no memory, no time): a
multiply-add is 2 FLOPs; the training step counts forward + backward as autograd runs it (frozen
weights get no weight gradients, so backward is about one forward, not two). Achieved FLOP/s =
counted FLOPs / median time; with --peak-tflops also the model FLOP utilisation (MFU).

peft (with diffusers) is a benchmark/test dependency only (requirements-dev.txt).
"""
import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from diff2flow import Diff2Flow, conditioned
from lora import CONV_IN, CONV_OUT, DEFAULT_TARGETS, inject_lora, lora_layers
import tiny
from unet import SD2_UNET, UNetConfig, UNetModel
from vae import SCALE_FACTOR, AutoencoderKL, VAEConfig

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."


# ----------------------------------------------------------------------------------------------
# Configurations

@dataclass
class BenchConfig:
    unet: UNetConfig
    vae: VAEConfig
    batch: int
    latent: tuple            # (h, w) of the latents; images are 2**(len(vae.ch_mult)-1) times larger
    rank: int                # LoRA rank on lora.DEFAULT_TARGETS (convs, q/k/v, ff, proj_in/out)
    repeats: int             # timed repeats per side (medians)
    warmup: int = 1          # untimed runs per side first (allocator, oneDNN/cuDNN plans, compile)
    dtype: str = "fp32"      # fp32, or bf16 autocast (LoRA and optimizer stay fp32)
    context_len: int = 77    # text tokens (the depth task uses the empty prompt's 77)
    cuda_only: bool = False
    note: str = ""


CONFIGS = {
    # SD2 layout in miniature: 4 levels, attention at the first three, linear proj, 32 channels per head
    "tiny": BenchConfig(
        unet=UNetConfig(in_channels=8, model_channels=32, channel_mult=(1, 2, 4, 4), context_dim=64,
                        num_heads=-1, num_head_channels=32, use_linear_in_transformer=True),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        batch=2, latent=(16, 16), rank=8, repeats=20, warmup=2,
        note="SD2 layout, channels 32/64/128/128"),
    # the README's demo: the bundled tiny prior's architecture at rank 64 (near its width: LoRA folds there)
    "demo": BenchConfig(unet=replace(tiny.UNET_CFG, in_channels=8), vae=tiny.VAE_CFG, batch=8, latent=(12, 16),
                        rank=64, repeats=20, warmup=2, note="the tiny prior, as python train.py --task depth trains it"),
    # DESIGN.md's CPU configuration: the full SD2.1 UNet (depth: 8 input channels) and SD's VAE
    "medium": BenchConfig(unet=replace(SD2_UNET, in_channels=8), vae=VAEConfig(),
                          batch=1, latent=(32, 32), rank=64, repeats=3, note="full SD2.1 UNet, random weights"),
    # the paper's depth training setting: 384x512 images, batch 8, bf16 (a GPU only)
    "sd21": BenchConfig(unet=replace(SD2_UNET, in_channels=8, attn_fp32=False), vae=VAEConfig(),
                        batch=8, latent=(48, 64), rank=64, repeats=10, warmup=3, dtype="bf16",
                        cuda_only=True, note="full SD2.1 at 384x512"),
}

# lora.TARGETS groups (LDM names) -> the same layers' names in diffusers (peft matches name suffixes)
DIFFUSERS_TARGETS = {
    "conv": ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"),
    "attn": ("to_q", "to_k", "to_v"),
    "attn_out": ("to_out.0",),
    "ff": ("ff.net.0.proj", "ff.net.2"),
    "proj": ("proj_in", "proj_out"),
}
FULL_TRAIN = (CONV_IN, CONV_OUT)          # trained in full, as train.py does for depth
DIFFUSERS_FULL_TRAIN = ("conv_in", "conv_out")


# ----------------------------------------------------------------------------------------------
# The two sides from one LDM state dict

def random_ldm_weights(bc, seed=0):
    """Our UNet and VAE with random weights, as single-file-checkpoint tensors (LDM prefixes).
    Weights keep PyTorch's default init (well scaled); every 1-d parameter (biases, norm scales) is
    perturbed so that a swapped or dropped norm or bias shows up in the parity check."""
    torch.manual_seed(seed)
    sd = {}
    for prefix, model in ((UNET_PREFIX, UNetModel(bc.unet)), (VAE_PREFIX, AutoencoderKL(bc.vae))):
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        sd.update({prefix + k: v for k, v in model.state_dict().items()})
    return sd


def ldm_original_config(bc):
    """The fields of an LDM yaml config that diffusers' single-file converters read."""
    u, v = bc.unet, bc.vae
    unet = dict(in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
                channel_mult=list(u.channel_mult), num_res_blocks=u.num_res_blocks,
                attention_resolutions=[2 ** level for level in u.attention_levels],
                transformer_depth=u.transformer_depth, context_dim=u.context_dim,
                use_linear_in_transformer=u.use_linear_in_transformer)
    if u.num_head_channels > 0:
        unet["num_head_channels"] = u.num_head_channels
    else:
        unet["num_heads"] = u.num_heads
    ddconfig = dict(ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks,
                    in_channels=v.in_channels, out_ch=v.out_channels, z_channels=v.z_channels)
    return {"model": {"params": {"unet_config": {"params": unet}, "scale_factor": SCALE_FACTOR,
                                 "first_stage_config": {"params": {"ddconfig": ddconfig, "embed_dim": v.embed_dim}}}}}


def strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def build_ours(bc, sd, device):
    """Our UNet and VAE holding the tensors of sd (built on the meta device, then assigned: no copy)."""
    with torch.device("meta"):
        unet, vae = UNetModel(bc.unet), AutoencoderKL(bc.vae)
    unet.load_state_dict(strip(sd, UNET_PREFIX), strict=True, assign=True)
    vae.load_state_dict(strip(sd, VAE_PREFIX), strict=True, assign=True)
    return unet.to(device), vae.to(device)


def build_theirs(bc, sd, device):
    """diffusers' UNet2DConditionModel and AutoencoderKL from the same LDM tensors, by diffusers' converters."""
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    original = ldm_original_config(bc)
    ucfg = create_unet_diffusers_config_from_ldm(original, sd)
    vcfg = create_vae_diffusers_config_from_ldm(original, sd)
    usd, vsd = convert_ldm_unet_checkpoint(sd, ucfg), convert_ldm_vae_checkpoint(sd, vcfg)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**ucfg), DAutoencoderKL(**vcfg)
    unet.load_state_dict(usd, strict=True, assign=True)
    vae.load_state_dict(vsd, strict=True, assign=True)
    return unet.to(device), vae.to(device)


class TheirUNet:
    """diffusers' UNet called like ours: net(x, timesteps, context) -> tensor."""
    def __init__(self, unet):
        self.unet = unet

    def __call__(self, x, timesteps, context):
        return self.unet(x, timesteps, encoder_hidden_states=context, return_dict=False)[0]


class TheirVAE:
    """diffusers' AutoencoderKL with vae.py's interface: encode -> SCALED posterior mean, decode <- SCALED."""
    def __init__(self, vae):
        self.vae = vae

    def encode(self, x):
        return self.vae.encode(x).latent_dist.mean * SCALE_FACTOR

    def decode(self, z):
        return self.vae.decode(z / SCALE_FACTOR, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------
# LoRA on both sides

def add_lora_ours(unet, bc):
    inject_lora(unet, bc.rank, targets=DEFAULT_TARGETS, full_train=FULL_TRAIN)


def add_lora_theirs(unet, bc):
    from peft import LoraConfig
    modules = [m for group in DEFAULT_TARGETS for m in DIFFUSERS_TARGETS[group]]
    unet.add_adapter(LoraConfig(r=bc.rank, lora_alpha=bc.rank, target_modules=modules, lora_dropout=0.0))
    for name in DIFFUSERS_FULL_TRAIN:  # add_adapter froze the base model; train these in full, as ours
        unet.get_submodule(name).requires_grad_(True)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def module_pairs(ours, theirs):
    """(our module path, their module path) of every layer, found by diffusers' converter itself: the
    converted state dict holds the very same tensors, so a shared weight storage names a pair."""
    by_ptr = {p.data_ptr(): n[: -len(".weight")] for n, p in ours.named_parameters() if n.endswith(".weight")}
    pairs = {}
    for n, p in theirs.named_parameters():
        n = n.replace(".base_layer", "")  # peft moves the base layer one level down
        if n.endswith(".weight") and p.data_ptr() in by_ptr:
            pairs[by_ptr[p.data_ptr()]] = n[: -len(".weight")]
    return pairs


def copy_lora(ours, theirs, seed=0):
    """Randomise our LoRA (up too, so it is not zero) and copy it into peft's layers: the two sides then
    compute the same function. Raises if a LoRA layer of ours has no LoRA counterpart in theirs."""
    g = torch.Generator().manual_seed(seed)
    pairs = module_pairs(ours, theirs)
    with torch.no_grad():
        for name, m in lora_layers(ours):
            m.lora_up.weight.copy_(0.02 * torch.randn(m.lora_up.weight.shape, generator=g))
            theirs_m = theirs.get_submodule(pairs[name])
            if not hasattr(theirs_m, "lora_A"):
                raise RuntimeError(f"LoRA on {name} but not on its diffusers twin {pairs[name]}")
            theirs_m.lora_A["default"].weight.copy_(m.lora_down.weight)
            theirs_m.lora_B["default"].weight.copy_(m.lora_up.weight)
            if theirs_m.scaling["default"] != m.scale:
                raise RuntimeError(f"LoRA scale differs on {name}: ours {m.scale}, peft {theirs_m.scaling['default']}")


# ----------------------------------------------------------------------------------------------
# What is timed

def make_inputs(bc, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = bc.latent
    down = 2 ** (len(bc.vae.ch_mult) - 1)
    u = bc.unet
    batch = dict(
        x=torch.randn(bc.batch, u.in_channels, h, w, generator=g),                     # (B, 8, h, w)
        t=torch.rand(bc.batch, generator=g) * 999,                                      # (B,) fractional τ
        context=torch.randn(bc.batch, bc.context_len, u.context_dim, generator=g),      # (B, 77, d)
        target=torch.randn(bc.batch, u.out_channels, h, w, generator=g),                # (B, 4, h, w)
        rgb=torch.rand(bc.batch, 3, h * down, w * down, generator=g) * 2 - 1,           # (B, 3, H, W)
        noise=torch.randn(bc.batch, bc.vae.z_channels, h, w, generator=g),              # (B, 4, h, w)
    )
    return {k: v.to(device) for k, v in batch.items()}


def autocast_for(bc, device):
    if bc.dtype == "bf16":
        return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext


def make_optimizer(params, kind):
    """AdamW; kind picks the implementation: 'foreach' (multi-tensor), 'fused' (one kernel), 'loop'."""
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **impl)


def train_step(net, opt, b, autocast):
    with autocast():
        out = net(b["x"], b["t"], b["context"])                      # (B, 4, h, w)
    loss = F.mse_loss(out.float(), b["target"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def depth_inference(net, vae, b, autocast, steps=2):
    """rgb -> VAE latent -> `steps` Euler steps of Diff2Flow on [x, image latent] -> decoded depth (3 ch)."""
    d2f = Diff2Flow("v", zero_snr=True)
    with autocast():
        img = vae.encode(b["rgb"])                                  # (B, 4, h, w) scaled latents
        model = conditioned(net, b["context"], concat=img)          # net([x, img], τ, context)
        latent = d2f.sample(model, b["noise"].to(img.dtype), steps, "diff2flow")
        return vae.decode(latent)                                   # (B, 3, H, W)


def interleaved(fns, repeats, warmup, sync):
    """Time each fn() `repeats` times, the sides run alternately (which goes first alternates too).
    Returns {name: {"wall": median wall seconds, "cpu": median CPU seconds of this process, "all": [...]}}.
    CPU time (user + system, all threads) is what a side cost, whatever else the machine runs: on a
    shared CPU with one torch thread it is the steadier measure; wall time is what a user waits."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    walls, cpus = {k: [] for k in fns}, {k: [] for k in fns}
    order = list(fns)
    for i in range(repeats):
        for k in (order if i % 2 == 0 else order[::-1]):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            sync()
            walls[k].append(time.perf_counter() - t0)
            cpus[k].append(time.process_time() - c0)
    return {k: {"wall": statistics.median(walls[k]), "cpu": statistics.median(cpus[k]), "all": walls[k]} for k in fns}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------
# FLOPs (fake tensors: shapes only)

# torch's counter knows the CUDA attention kernels; SDPA on CPU tensors runs this one (same math:
# Q K^T and P V, 2 * B * heads * N * L * head_dim FLOPs each; backward recomputes scores: 5 such products)
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
}


def count_flops(bc, what):
    """FLOPs of one UNet forward ('forward'), one LoRA training step's forward + backward ('train'),
    or one VAE encode + decode ('vae'), at bc's batch and latent size."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # shapes only, but a real device type
    h, w = bc.latent
    down = 2 ** (len(bc.vae.ch_mult) - 1)
    with FakeTensorMode():
        if what == "vae":
            vae = AutoencoderKL(bc.vae)
            rgb = torch.empty(bc.batch, 3, h * down, w * down)
        else:
            unet = UNetModel(bc.unet)
            if what == "train":
                add_lora_ours(unet, bc)
            x = torch.empty(bc.batch, bc.unet.in_channels, h, w)
            t = torch.empty(bc.batch)
            context = torch.empty(bc.batch, bc.context_len, bc.unet.context_dim)
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
            if what == "vae":
                vae.decode(vae.encode(rgb))
            else:
                out = unet(x, t, context)
                if what == "train":
                    out.float().square().mean().backward()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------
# Peak memory

def keep_freed_memory():
    """glibc hands every freed block between 128 KB and 32 MB back to the OS and faults it in again
    (zeroed) on the next step: on the CPU that is ~15% of an SD2.1 LoRA step in page faults. Keep
    such blocks in the heap instead (measured on the medium config: CPU time per step 4.8 -> 4.1 s,
    minor faults 530k -> 1k, same peak RSS). Linux/glibc only; a no-op elsewhere."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all(libc.mallopt(opt, val) == 1 for opt, val in
               ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 256 << 20)))


def _proc_status_bytes(field):
    """VmRSS (resident now) or VmHWM (resident high-water mark) of this process, in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def peak_memory(side, bc, weights, device, opt_kind, channels_last):
    """Peak memory of LoRA training steps for ONE side, alone in this process (run it in a fresh one).

    CPU: how far the resident set grows above what it was before the model was loaded (after the
    imports, so torch/diffusers/peft code is not counted): VmHWM - VmRSS_before. VmHWM also counts
    memory the allocator keeps after a free, i.e. what the process really held. The warm-up step
    (which allocates the optimizer state and sizes the allocator's pools) is included; loading is not:
    both sides load the same way (meta build + assign of the file's tensors, no copy), then the mark
    is reset by writing 5 to /proc/self/clear_refs after the model is built. CUDA: the caching
    allocator's max_memory_allocated, everything on the device counted.
    Returns (growth, peak) in bytes.
    """
    cuda = device.startswith("cuda")
    # both sides import the same code before the baseline (code is not training memory)
    import diffusers.loaders.single_file_utils  # noqa: F401
    import peft  # noqa: F401
    gc.collect()
    rss0 = 0 if cuda else _proc_status_bytes("VmRSS")
    sd = load_file(weights, device=device)
    if side == "ours":
        unet, _ = build_ours(bc, sd, device)
        add_lora_ours(unet, bc)
        net = unet
    else:
        unet, _ = build_theirs(bc, sd, device)
        add_lora_theirs(unet, bc)
        net = TheirUNet(unet)
    del sd
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    b = make_inputs(bc, device)
    opt = make_optimizer(trainable(unet), opt_kind)
    autocast = autocast_for(bc, device)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    for _ in range(3):  # the first one allocates AdamW's state
        train_step(net, opt, b, autocast)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return peak, peak
    peak = _proc_status_bytes("VmHWM")
    return peak - rss0, peak


def peak_memory_in_child(side, args, weights):
    cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--device", args.device,
           "--optimizer", args.optimizer, "--child", side, "--weights", weights]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.channels_last:
        cmd.append("--channels-last")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.keep_freed_memory:
        cmd.append("--keep-freed-memory")
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("PEAK ")]
    if out.returncode or not lines:
        raise RuntimeError(f"memory child for {side} failed:\n{out.stderr[-3000:]}")
    return tuple(int(v) for v in lines[-1].split()[1:])  # (growth, peak)


# ----------------------------------------------------------------------------------------------
# The benchmark

def log_times(log, what, med):
    o, t = med["ours"], med["theirs"]
    paired = sorted(a / b for a, b in zip(o["all"], t["all"]))  # each repeat's pair ran back to back
    log(f"{what}: wall ours {o['wall']:.4f} s, theirs {t['wall']:.4f} s, ratio {o['wall'] / t['wall']:.3f}; "
        f"CPU time ours {o['cpu']:.4f} s, theirs {t['cpu']:.4f} s, ratio {o['cpu'] / t['cpu']:.3f}; "
        f"paired wall ratios {paired[0]:.3f}..{paired[-1]:.3f} (median {statistics.median(paired):.3f})\n"
        f"  wall times ours {[round(x, 3) for x in o['all']]}\n  wall times theirs {[round(x, 3) for x in t['all']]}")


def run(args, bc, log=print):
    device, cuda = args.device, args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = autocast_for(bc, device)
    res = {"rows": []}

    # FLOPs first: meta device, costs nothing
    flops = {k: count_flops(bc, k) for k in ("forward", "train", "vae")}
    flops["infer"] = 2 * flops["forward"] + flops["vae"]
    res["flops"] = flops
    log(f"FLOPs: UNet forward {flops['forward'] / 1e9:.1f} G, LoRA train step {flops['train'] / 1e9:.1f} G, "
        f"2-step depth inference {flops['infer'] / 1e9:.1f} G")

    sd = random_ldm_weights(bc)
    weights = None
    if args.memory and not cuda:  # the memory children read the same weights from a file
        fd, weights = tempfile.mkstemp(suffix=".safetensors", prefix="bench_")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in sd.items()}, weights)
    ours, ours_vae = build_ours(bc, sd, device)
    theirs, theirs_vae = build_theirs(bc, sd, device)
    del sd
    if args.channels_last:
        for m in (ours, ours_vae, theirs, theirs_vae):
            m.to(memory_format=torch.channels_last)
    tnet, tvae = TheirUNet(theirs), TheirVAE(theirs_vae)
    b = make_inputs(bc, device)
    variants = [("eager", False)] + ([("compiled", True)] if args.compile else [])

    # --- 1. inference: parity, then time
    if args.infer:
        out_o, out_t = depth_inference(ours, ours_vae, b, autocast), depth_inference(tnet, tvae, b, autocast)
        res["infer_err"] = rel_err(out_o, out_t)
        log(f"inference parity: relative error {res['infer_err']:.2e}")
        # eager only: latency of a one-off 2-step call, where compiling would not pay for itself
        med = interleaved({"ours": lambda: depth_inference(ours, ours_vae, b, autocast),
                           "theirs": lambda: depth_inference(tnet, tvae, b, autocast)},
                          bc.repeats, bc.warmup, sync)
        res["rows"].append(("infer", "eager", med["ours"], med["theirs"]))
        log_times(log, "2-step depth inference (eager)", med)
    del ours_vae, theirs_vae, tvae

    # --- 2. LoRA on both, same layers and same values
    add_lora_ours(ours, bc)
    add_lora_theirs(theirs, bc)
    c_o, c_t = sum(p.numel() for p in trainable(ours)), sum(p.numel() for p in trainable(theirs))
    res["trainable"] = (c_o, c_t)
    log(f"trainable parameters: ours {c_o:,}, diffusers+peft {c_t:,}")
    if c_o != c_t:
        raise RuntimeError(f"trainable parameter counts differ (ours {c_o:,}, theirs {c_t:,}): not the same LoRA")
    copy_lora(ours, theirs)
    with torch.no_grad(), autocast():
        res["train_err"] = rel_err(ours(b["x"], b["t"], b["context"]).float(), tnet(b["x"], b["t"], b["context"]).float())
    log(f"LoRA UNet parity: relative error {res['train_err']:.2e}")

    # --- 3. training steps
    for label, comp in variants:
        opt_o, opt_t = make_optimizer(trainable(ours), args.optimizer), make_optimizer(trainable(theirs), args.optimizer)
        n_o = torch.compile(ours) if comp else ours
        n_t = TheirUNet(torch.compile(theirs)) if comp else tnet
        steps = {"ours": lambda: train_step(n_o, opt_o, b, autocast), "theirs": lambda: train_step(n_t, opt_t, b, autocast)}
        med = interleaved(steps, bc.repeats, bc.warmup, sync)
        res["rows"].append(("train", label, med["ours"], med["theirs"]))
        log_times(log, f"LoRA train step ({label})", med)
        if cuda and args.memory:  # the caching allocator sees each side's own allocations exactly
            peaks = {}
            for side, fn in steps.items():
                gc.collect()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                model = ours if side == "ours" else theirs
                own = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
                own += sum(t.numel() * t.element_size() for o in ((opt_o,) if side == "ours" else (opt_t,))
                           for s in o.state.values() for t in s.values() if torch.is_tensor(t))
                peaks[side] = own + torch.cuda.max_memory_allocated() - base
            res["rows"].append(("memory", label, peaks["ours"], peaks["theirs"]))
        del opt_o, opt_t, steps

    # --- 4. CPU memory: one fresh process per side, ours then theirs then again (the lower of two)
    if args.memory and not cuda:
        del ours, theirs, tnet, n_o, n_t, b
        gc.collect()
        try:
            peaks = {s: min(peak_memory_in_child(s, args, weights) for _ in range(args.memory_runs))
                     for s in ("ours", "theirs")}
        finally:
            os.remove(weights)
        res["rows"].append(("memory", "eager", peaks["ours"][0], peaks["theirs"][0]))
        res["rss_peak"] = (peaks["ours"][1], peaks["theirs"][1])
        log(f"resident memory of training, growth above the imports: ours {peaks['ours'][0] / 2**30:.2f} GiB, "
            f"theirs {peaks['theirs'][0] / 2**30:.2f} GiB, ratio {peaks['ours'][0] / peaks['theirs'][0]:.3f} "
            f"(whole process: ours {peaks['ours'][1] / 2**30:.2f} GiB, theirs {peaks['theirs'][1] / 2**30:.2f} GiB)")
    return res


def table(args, bc, res, command):
    """The markdown table for the README, with the command that made it."""
    flops = res["flops"]
    cuda = args.device.startswith("cuda")
    dev = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    import diffusers
    import peft
    h, w = bc.latent
    lines = [
        f"`{command}` ({bc.note}; torch {torch.__version__.split('+')[0]}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}; {dev}; {bc.dtype}{', channels_last' if args.channels_last else ''}"
        f"{', malloc keeps freed memory' if args.keep_freed_memory else ''}, "
        f"AdamW {args.optimizer})",
        "",
        f"Batch {bc.batch}, latents {h}x{w}, LoRA rank {bc.rank} on convs, q/k/v, ff and proj_in/out + "
        f"conv_in/conv_out in full: {res['trainable'][0]:,} trainable parameters on both sides. "
        f"UNet forward {flops['forward'] / 1e9:.1f} GFLOPs, training step {flops['train'] / 1e9:.1f} GFLOPs, "
        f"2-step inference {flops['infer'] / 1e9:.1f} GFLOPs. Medians of {bc.repeats} interleaved repeats "
        f"(wall time; GFLOP/s = counted FLOPs / wall time). "
        f"Outputs agree before timing (relative error: LoRA UNet {res['train_err']:.0e}"
        + (f", inference {res['infer_err']:.0e}" if "infer_err" in res else "") + ").",
        "",
        "| measure | ours | diffusers + peft | ours / theirs |" + ("" if cuda else " ours / theirs, CPU time |"),
        "|---|---|---|---|" + ("" if cuda else "---|"),
    ]
    for kind, label, o, t in res["rows"]:
        if kind == "memory":
            how = "allocator peak" if cuda else "resident-set growth, own process"
            lines.append(f"| peak memory, LoRA training ({label}; {how}) | {o / 2**30:.2f} GiB | {t / 2**30:.2f} GiB "
                         f"| {o / t:.2f} |" + ("" if cuda else " |"))
            continue
        f = flops["train" if kind == "train" else "infer"]
        what = "LoRA training step" if kind == "train" else "2-step depth inference"

        def rate(s):
            r = f / s / 1e9
            return f"{s:.3f} s ({r:,.0f} GFLOP/s" + (f", MFU {100 * r / (1e3 * args.peak_tflops):.0f}%" if args.peak_tflops else "") + ")"
        lines.append(f"| {what} ({label}) | {rate(o['wall'])} | {rate(t['wall'])} | {o['wall'] / t['wall']:.2f} |"
                     + ("" if cuda else f" {o['cpu'] / t['cpu']:.2f} |"))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=list(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="override the config's dtype")
    p.add_argument("--repeats", type=int, default=None, help="override the config's repeats")
    p.add_argument("--optimizer", default="fused", choices=["foreach", "fused", "loop"],
                   help="AdamW implementation, the same on both sides (default fused: measured 3.9x faster than "
                        "foreach on the CPU for SD2.1's 61.5 M LoRA parameters)")
    p.add_argument("--channels-last", action="store_true", help="both sides in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd UNets (default for sd21)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    p.add_argument("--memory-runs", type=int, default=1, help="fresh processes per side for memory (the lowest counts)")
    p.add_argument("--no-infer", dest="infer", action="store_false", help="skip the inference latency")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (dense bf16) TFLOP/s, for MFU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="tune glibc malloc to keep freed blocks (see keep_freed_memory; both sides alike)")
    p.add_argument("--child", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    bc = CONFIGS[args.config]
    if args.dtype:
        bc = replace(bc, dtype=args.dtype)
    if args.repeats:
        bc = replace(bc, repeats=args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_memory():
        print("--keep-freed-memory: no glibc here; malloc left as it is")
    cuda = args.device.startswith("cuda")
    if bc.cuda_only and not cuda:
        print(f"--config {args.config} is the full SD2.1 at 384x512, batch 8, bf16: it needs a GPU "
              f"(run it with --device cuda). On a CPU use --config tiny or --config medium.")
        return None
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available here")
    if args.config == "sd21":
        args.compile = True

    if args.child:  # a memory measurement, alone in this process
        print("PEAK", *peak_memory(args.child, bc, args.weights, args.device, args.optimizer, args.channels_last))
        return None

    command = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = run(args, bc)
    text = table(args, bc, res, command)
    print()
    print(text)
    return res


if __name__ == "__main__":
    main()
