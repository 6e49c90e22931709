"""
The Stable Diffusion UNet (SD 1.x and SD 2.x), with the original LDM parameter names.

Every attribute name below (input_blocks, middle_block, output_blocks, time_embed, out; ResBlock's
in_layers/emb_layers/out_layers/skip_connection; SpatialTransformer's norm/proj_in/transformer_blocks/
proj_out; attn1/attn2/ff/norm1-3) is the name in the released single-file checkpoints, so their
`model.diffusion_model.*` tensors load with a strict load_state_dict and no renaming table.

The two released families differ only in these rows (everything else is shared):

    |                        | SD 1.5                          | SD 2.1 (768-v)                        |
    |------------------------|---------------------------------|---------------------------------------|
    | text encoder           | CLIP ViT-L/14, last layer       | OpenCLIP ViT-H/14, penultimate layer  |
    | context_dim            | 768                             | 1024                                  |
    | attention heads        | 8 heads (head width 40/80/160)  | 64 channels per head (5/10/20 heads)  |
    | proj_in / proj_out     | 1x1 Conv2d                      | Linear                                |
    | prediction             | eps                             | v (the 512-base model: eps)           |
    | attention in fp16      | fine                            | overflows: use attn_fp32=True         |
    | parameters             | 859,520,964                     | 865,910,724                           |
    | shared                 | model_channels 320, channel_mult (1, 2, 4, 4), 2 ResBlocks per     |
    |                        | level, attention at levels 0-2 (LDM attention_resolutions 1, 2, 4),|
    |                        | transformer depth 1, GroupNorm(32), time embedding 1280, 4 -> 4 ch |

A file does not store the head rule (heads do not change any tensor shape): the config reader below
uses SD's rule (conv proj_in -> 8 heads, linear proj_in -> 64 channels per head) unless told.
"""
from contextlib import nullcontext
from dataclasses import dataclass, replace
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4                 # 8 after widen_input_conv (concatenated image latent)
    out_channels: int = 4
    model_channels: int = 320            # width of level 0; level i has model_channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 4, 4)   # one entry per resolution level
    num_res_blocks: int = 2              # ResBlocks per level on the way down (+1 on the way up)
    attention_levels: tuple = (0, 1, 2)  # levels with a SpatialTransformer (LDM attention_resolutions = 2**level)
    transformer_depth: int = 1           # BasicTransformerBlocks per SpatialTransformer
    context_dim: int = 768               # width of the text embedding (cross-attention keys/values)
    num_heads: int = 8                   # used when num_head_channels == -1 (SD1)
    num_head_channels: int = -1          # channels per head (SD2: 64); overrides num_heads
    use_linear_in_transformer: bool = False  # SD2: Linear proj_in/proj_out instead of 1x1 convs
    attn_fp32: bool = False              # compute attention in fp32 (SD2.1 overflows in fp16)
    use_checkpoint: bool = False         # non-reentrant gradient checkpointing of every block

    def heads_at(self, ch):
        """(heads, head width) of a SpatialTransformer on ch channels."""
        heads = ch // self.num_head_channels if self.num_head_channels > 0 else self.num_heads
        if heads < 1 or ch % heads:
            raise ValueError(f"{ch} channels cannot be split into heads (num_heads={self.num_heads}, "
                             f"num_head_channels={self.num_head_channels})")
        return heads, ch // heads


SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(context_dim=1024, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True)


# ----------------------------------------------------------------------------- building blocks

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t: (B,) -> (B, dim).
    emb = [cos(t * w_k), sin(t * w_k)], w_k = max_period^(-k / (dim/2)), k = 0..dim/2-1 (cos first, as LDM).
    Smooth in t, so the network can be called at any real timestep."""
    half = dim // 2
    dt = torch.promote_types(t.dtype, torch.float32)  # fp32 at least: fractional t must not round to bf16
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dt, device=t.device) / half)
    args = t.to(dt)[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 at least (as LDM), so half-precision weights and inputs stay stable."""
    def forward(self, x):
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.group_norm(x.to(dt), self.num_groups, self.weight.to(dt), self.bias.to(dt), self.eps).to(x.dtype)


def norm(ch, eps=1e-5):
    return GroupNorm32(32, ch, eps=eps)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-conv, plus a skip."""
    def __init__(self, ch, emb_ch, out_ch):
        super().__init__()
        self.in_layers = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(norm(out_ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):  # x: (B, ch, H, W), emb: (B, emb_ch)
        h = self.in_layers(x)  # (B, out_ch, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention of x onto context (self-attention when context is None)."""
    def __init__(self, dim, context_dim, heads, head_dim, attn_fp32=False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.attn_fp32 = heads, attn_fp32
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):  # x: (B, N, dim), context: (B, L, context_dim)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N|L, inner)
        B, N, inner = q.shape
        q, k, v = (t.view(B, -1, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, N|L, hd)
        # attn_fp32: upcast and keep autocast from casting back down (the softmax logits of SD2.1 overflow fp16)
        with torch.autocast(x.device.type, enabled=False) if self.attn_fp32 else nullcontext():
            dt = torch.promote_types(q.dtype, torch.float32) if self.attn_fp32 else q.dtype
            out = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt))  # (B, nh, N, hd), scale hd^-0.5
        out = out.to(q.dtype).transpose(1, 2).reshape(B, N, inner)  # (B, N, inner)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a * gelu(b), [a, b] = proj(x)."""
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention onto the text, GEGLU feed-forward; each residual."""
    def __init__(self, dim, heads, head_dim, context_dim, attn_fp32=False):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim, attn_fp32)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, attn_fp32)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):  # (B, N, dim)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image feature map -> tokens -> transformer blocks -> feature map, plus a skip."""
    def __init__(self, ch, heads, head_dim, depth, context_dim, use_linear, attn_fp32=False):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = GroupNorm32(32, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if use_linear else nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, attn_fp32) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, ch) if use_linear else nn.Conv2d(inner, ch, 1)

    def forward(self, x, context):  # x: (B, C, H, W), context: (B, L, context_dim)
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)  # (B, inner, H, W)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, inner or C)
        if self.use_linear:
            h = self.proj_in(h)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)  # (B, H*W, C)
        h = h.transpose(1, 2).reshape(B, -1, H, W)  # (B, inner or C, H, W)
        if not self.use_linear:
            h = self.proj_out(h)  # (B, C, H, W)
        return x + h


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; each gets what it needs: ResBlocks the time embedding, transformers the text."""
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------- the UNet

class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg = replace(cfg)  # a copy: set_options and widen_input_conv edit it
        mc, emb_ch = cfg.model_channels, cfg.model_channels * 4

        def transformer(ch):
            heads, head_dim = cfg.heads_at(ch)
            return SpatialTransformer(ch, heads, head_dim, cfg.transformer_depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer, cfg.attn_fp32)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        # down: level by level, num_res_blocks (ResBlock [+ transformer]) then a Downsample but at the last level
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chs, ch = [mc], mc  # channels of every skip feature, consumed in reverse by the up path
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mc * mult)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chs.append(ch)

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_ch, ch), transformer(ch), ResBlock(ch, emb_ch, ch))

        # up: mirror image, num_res_blocks + 1 blocks per level, each eating one skip feature
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), emb_ch, mc * mult)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def set_options(self, attn_fp32=None, use_checkpoint=None):
        """Switch the two runtime options after construction (e.g. after load_sd_checkpoint)."""
        if attn_fp32 is not None:
            self.cfg.attn_fp32 = attn_fp32
            for m in self.modules():
                if isinstance(m, CrossAttention):
                    m.attn_fp32 = attn_fp32
        if use_checkpoint is not None:
            self.cfg.use_checkpoint = use_checkpoint

    def _run(self, block, h, emb, context):
        if self.cfg.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x, timesteps, context):
        """x: (B, in_channels, H, W) latents; timesteps: (B,) or scalar, real-valued (fractional allowed);
        context: (B, L, context_dim). Returns (B, out_channels, H, W): what the model was trained to
        predict (eps or v; the file does not say which)."""
        down = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.shape[-2] % down or x.shape[-1] % down:
            raise ValueError(f"UNet input height and width must be multiples of {down}, got {tuple(x.shape[-2:])}")
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])  # (B,)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))  # (B, 4 * mc)
        context = context.to(x.dtype)
        hs, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            hs.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


def widen_input_conv(unet, in_channels=8):
    """Widen the first conv for concatenated conditioning [x_noisy, image_latent] (DepthFM, Marigold):
    new weight = old weight repeated along the input channels and divided by the repeat count, so on
    [x, x] the output is exactly what it was on x. In place; updates unet.cfg.in_channels."""
    conv = unet.input_blocks[0][0]
    old = conv.weight.shape[1]
    if in_channels % old:
        raise ValueError(f"widen_input_conv: {in_channels} input channels is not a multiple of the current {old}")
    k = in_channels // old
    with torch.no_grad():
        w = conv.weight.repeat(1, k, 1, 1) / k  # (out, in_channels, 3, 3)
    conv.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
    conv.in_channels = in_channels
    unet.cfg.in_channels = in_channels
    return unet


# ----------------------------------------------------------------------------- config from a state dict

def unet_config_from_state_dict(sd, num_heads=None, num_head_channels=None, **options):
    """Read a UNetConfig off the tensor shapes of an LDM UNet state dict (keys WITHOUT the
    `model.diffusion_model.` prefix). Heads cannot be read from shapes: by default SD's rule
    (conv proj_in -> 8 heads, linear proj_in -> 64 channels per head); pass either to override.
    options: attn_fp32, use_checkpoint."""
    def need(key):
        if key not in sd:
            found = ", ".join(list(sd)[:5])
            raise ValueError(f"not an SD UNet state dict: no '{key}' (first keys found: {found})")
        return sd[key]

    def depth(prefix):  # number of BasicTransformerBlocks in the SpatialTransformer at prefix
        return sum(1 for k in sd if k.startswith(prefix + ".transformer_blocks.") and k.endswith(".attn1.to_q.weight"))

    if "label_emb.0.0.weight" in sd or "label_emb.weight" in sd:
        raise ValueError("UNet has class/size conditioning (label_emb: SDXL or the x4 upscaler); only SD1/SD2 are supported")
    w_in = need("input_blocks.0.0.weight")  # (mc, in_channels, 3, 3)
    mc, in_channels = w_in.shape[0], w_in.shape[1]
    out_channels = need("out.2.weight").shape[0]
    use_linear = need("middle_block.1.proj_in.weight").ndim == 2  # SD2: Linear, SD1: 1x1 conv
    context_dim = need("middle_block.1.transformer_blocks.0.attn2.to_k.weight").shape[1]

    # walk input_blocks 1.. : a ResBlock (in_layers) or a Downsample (op) at sub-index 0
    channel_mult, res_per_level, attention_levels, depths = [], [0], set(), set()
    i = 1
    while f"input_blocks.{i}.0.in_layers.2.weight" in sd or f"input_blocks.{i}.0.op.weight" in sd:
        level = len(res_per_level) - 1
        if f"input_blocks.{i}.0.op.weight" in sd:
            res_per_level.append(0)
        else:
            ch = sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0]
            if res_per_level[level] == 0:
                channel_mult.append(ch // mc)
            res_per_level[level] += 1
            if f"input_blocks.{i}.1.proj_in.weight" in sd:
                attention_levels.add(level)
                depths.add(depth(f"input_blocks.{i}.1"))
        i += 1
    depths.add(depth("middle_block.1"))
    if len(set(res_per_level)) != 1 or len(channel_mult) != len(res_per_level):
        raise ValueError(f"UNet levels have different numbers of ResBlocks {res_per_level}; not an SD layout")
    if len(depths) > 1:
        raise ValueError(f"UNet transformer depth differs between levels {sorted(depths)} (SDXL-style); not supported")
    if num_heads is None and num_head_channels is None:
        num_heads, num_head_channels = (-1, 64) if use_linear else (8, -1)
    return UNetConfig(
        in_channels=in_channels, out_channels=out_channels, model_channels=mc, channel_mult=tuple(channel_mult),
        num_res_blocks=res_per_level[0], attention_levels=tuple(sorted(attention_levels)),
        transformer_depth=depths.pop(),
        context_dim=context_dim,
        num_heads=num_heads if num_heads is not None else -1,
        num_head_channels=num_head_channels if num_head_channels is not None else -1,
        use_linear_in_transformer=use_linear, **options)
