"""
Stable Diffusion's autoencoders: the KL autoencoder with the original LDM parameter names
(`first_stage_model.encoder/decoder/quant_conv/post_quant_conv` in the single-file checkpoints), and
TAESD, the tiny distilled autoencoder (madebyollin/taesd) for fast previews and training-time decoding.

Both speak the same language:
    encode(x):  images in [-1, 1], (B, 3, H, W)  ->  SCALED latents (B, 4, H/8, W/8), i.e. already
                multiplied by SCALE_FACTOR, the space the UNet works in
    decode(z):  SCALED latents  ->  images in [-1, 1] (not clamped)
AutoencoderKL.encode takes the posterior mean (no sampling), as Marigold and the Diff2Flow code do;
AutoencoderKL.moments gives the unscaled (mean, logvar) when the distribution itself is wanted.
SD1 and SD2 share the same autoencoder.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SCALE_FACTOR = 0.18215  # SD1/SD2: latents are scaled to roughly unit variance before the UNet sees them


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128                 # width of the first level
    ch_mult: tuple = (1, 2, 4, 4)  # one entry per level; H/2**(len-1) latents
    num_res_blocks: int = 2       # ResnetBlocks per level (decoder: +1)
    z_channels: int = 4           # latent channels
    embed_dim: int = 4            # channels after quant_conv (equal to z_channels in SD)


# ----------------------------------------------------------------------------- building blocks

class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, eps 1e-6) computed in fp32 at least, so fp16/bf16 weights stay stable."""
    def __init__(self, ch):
        super().__init__(32, ch, eps=1e-6)

    def forward(self, x):
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.group_norm(x.to(dt), self.num_groups, self.weight.to(dt), self.bias.to(dt), self.eps).to(x.dtype)


class ResnetBlock(nn.Module):
    def __init__(self, ch, out_ch):
        super().__init__()
        self.norm1 = GroupNorm32(ch)
        self.conv1 = nn.Conv2d(ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm32(out_ch)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(ch, out_ch, 1) if ch != out_ch else nn.Identity()

    def forward(self, x):  # (B, ch, H, W) -> (B, out_ch, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv projections."""
    def __init__(self, ch):
        super().__init__()
        self.norm = GroupNorm32(ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(2, 3) for t in (self.q(h), self.k(h), self.v(h)))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C^-0.5
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (LDM's asymmetric padding)."""
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResnetBlocks, then (except at the coarsest/finest end) a resampler.
    `attn` is an empty list kept for the LDM names; SD has no attention inside the levels."""
    def __init__(self, blocks, resample=None):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList()
        if resample is not None:
            setattr(self, "downsample" if isinstance(resample, Downsample) else "upsample", resample)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        chs = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)]  # input width of level i is chs[i]
        self.down = nn.ModuleList()
        for i in range(n):
            blocks = [ResnetBlock(chs[i] if j == 0 else chs[i + 1], chs[i + 1]) for j in range(cfg.num_res_blocks)]
            self.down.append(Level(blocks, Downsample(chs[i + 1]) if i != n - 1 else None))
        self.mid = Mid(chs[-1])
        self.norm_out = GroupNorm32(chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):  # (B, 3, H, W) -> (B, 2 z, H/2**(n-1), W/2**(n-1))
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch)
        levels = []  # built coarse to fine, stored fine to coarse (up[0] is the full-resolution level)
        for i in reversed(range(n)):
            out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(ch if j == 0 else out, out) for j in range(cfg.num_res_blocks + 1)]
            ch = out
            levels.insert(0, Level(blocks, Upsample(ch) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = GroupNorm32(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- the autoencoder

class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def moments(self, x):
        """Images in [-1, 1] -> the posterior's UNSCALED (mean, logvar), each (B, embed_dim, h, w)."""
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)

    def encode(self, x):
        """Images in [-1, 1] -> posterior mean, SCALED by SCALE_FACTOR: the UNet's latent space."""
        return self.moments(x)[0] * SCALE_FACTOR

    def decode(self, z):
        """SCALED latents (as encode returns them) -> images in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z / SCALE_FACTOR))


def vae_config_from_state_dict(sd):
    """Read a VAEConfig off the shapes of an LDM autoencoder state dict (keys without `first_stage_model.`)."""
    def need(key):
        if key not in sd:
            raise ValueError(f"not an SD autoencoder state dict: no '{key}' (first keys found: {', '.join(list(sd)[:5])})")
        return sd[key]

    if any(".attn.0." in k for k in sd if k.startswith(("encoder.down.", "decoder.up."))):
        raise ValueError("autoencoder has attention inside its levels (encoder.down.*.attn); SD's has none")
    conv_in = need("encoder.conv_in.weight")  # (ch, in_channels, 3, 3)
    ch = conv_in.shape[0]
    n = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    ch_mult = tuple(need(f"encoder.down.{i}.block.0.conv2.weight").shape[0] // ch for i in range(n))
    num_res_blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    z = need("decoder.conv_in.weight").shape[1]
    return VAEConfig(in_channels=conv_in.shape[1], out_channels=need("decoder.conv_out.weight").shape[0], ch=ch,
                     ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z,
                     embed_dim=need("post_quant_conv.weight").shape[1])


# ----------------------------------------------------------------------------- TAESD

def conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3)."""
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels=4):
    # nn.Sequential: the released taesd_encoder.pth keys are these indices ("0.weight", "1.conv.0.weight", ...)
    return nn.Sequential(
        conv(3, 64), Block(64, 64),
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        conv(64, latent_channels))


def taesd_decoder(latent_channels=4):
    # index 0 is the parameter-free Clamp, so the released taesd_decoder.pth starts at "1.weight"
    return nn.Sequential(
        Clamp(), conv(latent_channels, 64), nn.ReLU(),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), conv(64, 3))


class TAESD(nn.Module):
    """Tiny autoencoder distilled to SD's latent space (2.4 M parameters instead of 84 M). Its native
    interface is images in [0, 1]; encode/decode here use [-1, 1] like AutoencoderKL, and the
    latents are SD's SCALED latents. Load the released weights with checkpoint.load_taesd."""
    def __init__(self, latent_channels=4):
        super().__init__()
        self.encoder, self.decoder = taesd_encoder(latent_channels), taesd_decoder(latent_channels)

    def encode(self, x):
        """Images in [-1, 1] -> SCALED latents (as AutoencoderKL.encode)."""
        return self.encoder((x + 1) / 2)

    def decode(self, z):
        """SCALED latents -> images in [-1, 1] (not clamped)."""
        return self.decoder(z) * 2 - 1
