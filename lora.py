"""
Hand-written LoRA (Hu et al., ICLR 2022) for nn.Linear and nn.Conv2d, and its kohya-format files.

    y = W x + b + (alpha / rank) * up(down(dropout(x)))        W frozen, down/up trained, up = 0 at init

- Linear: down = Linear(in, r), up = Linear(r, out). Conv2d: down = k x k conv with the base conv's
  stride, padding and dilation (so it sees exactly the pixels the base conv sees), up = 1 x 1 conv.
- The LoRA layers ARE the base layers: `LoRALinear` is an nn.Linear that shares the base layer's
  `weight`/`bias` Parameters and adds two children, `lora_down` and `lora_up`. So the base weights
  keep their state-dict names (`...to_q.weight`), checkpoints load and save with the original LDM
  names, code that asks `isinstance(m, nn.Conv2d)` still works, and the forward pass is plain code
  (no hooks). Alternatives were worse: a wrapper holding `.base` renames every base key to
  `...to_q.base.weight`; forward hooks hide the computation from a reader.
- Where the rank is close to the layer's width (the tiny prior at rank 64) the forward pass folds the
  update into the weight, (W + scale * up @ down) x, which is the same function and cheaper there;
  each call picks the cheaper form from the shapes (`LoRALayer._fold_is_cheaper`).
- Targets are groups of module paths in the original LDM UNet naming (table `TARGETS`); the code
  itself works on any nn.Module whose layers carry those names. It knows nothing of Diff2Flow.

File format (what ComfyUI, A1111 and diffusers read, see DESIGN.md "LoRA"):
    lora_unet_<module path, dots as underscores>.lora_down.weight   (r, in) or (r, in, k, k)
    lora_unet_<...>.lora_up.weight                                  (out, r) or (out, r, 1, 1)
    lora_unet_<...>.alpha                                           scalar; scale = alpha / r
                                                                    (one alpha for all layers: save_lora)
  with the LDM module path relative to the UNet (no `model.diffusion_model.` prefix), e.g.
  `lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`. LoRA tensors only: diffusers
  refuses a kohya file with any other key. Parameters trained in full (the widened input conv, the
  last conv) go in a companion file `<name>.full.safetensors` beside `<name>.safetensors`, with
  state-dict names (`input_blocks.0.0.weight`); `load_lora` reads it when present.
  ComfyUI and A1111 map these names onto their own LDM-layout UNet directly. diffusers 0.42
  (`StableDiffusionLoraLoaderMixin.lora_state_dict(sd, unet_config=...)` + `load_lora_into_unet`)
  reproduces our output exactly except for one layer it misplaces: the Upsample conv of SD's
  attention-free up level (`output_blocks.2.1.conv`), which it drops with an "unexpected keys"
  warning (its name mapping assumes index 1 of an output block is an attention block).

Public API
    inject_lora(model, rank, alpha=None, targets=DEFAULT_TARGETS, dropout=0.0, full_train=()) -> names
    merge_lora(model), unmerge_lora(model), bake_lora(model), lora_layers(model), lora_state_dict(model)
    lora_metadata(base, prediction_type, ...) -> dict;  save_lora(path, model, metadata) -> dict
    load_lora(path, model) -> metadata;  read_metadata(path);  companion_path(path)
    lora_rank(rank, n_in, n_out);  parse_targets(spec, rank);  TARGETS, DEFAULT_TARGETS, PRESETS, CONV_IN, CONV_OUT
"""
import datetime
import hashlib
import math
import os

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------------
# The two layers


class LoRALayer:
    """Mixin for LoRALinear / LoRAConv2d: the low-rank branch, merge and unmerge.

    The base layer's own forward computes W x + b; the branch adds (alpha/rank) * up(down(x)).
    LoRA parameters are created in fp32 and stay fp32: under bf16 autocast the matmuls run in bf16
    but the optimizer updates fp32 master weights; with a bf16 base and no autocast the branch runs
    in fp32 and its output is cast to the base's dtype. (So cast the base model, e.g. to bf16,
    before inject_lora, not after: model.to(dtype) casts every parameter.)
    """

    def _add_lora(self, down, up, rank, alpha, dropout):
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.lora_down, self.lora_up = down, up
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))  # nn.Linear's default init
        nn.init.zeros_(up.weight)  # B = 0: the model starts exactly where the base model is
        self.merged = False
        self.fold = None  # None: fold the update into W when that is cheaper (below); True/False: force
        # a copy of W taken by merge() so that unmerge() restores it bit for bit
        self.register_buffer("weight_before_merge", None, persistent=False)

    def forward(self, x):
        if self.merged:
            return super().forward(x)
        fold = self._fold_is_cheaper(x) if self.fold is None else self.fold
        if fold:
            # up(down(x)) is linear in x, so the branch equals one layer with weight W + scale * up @ down;
            # autograd still trains only up and down
            delta = self._up_down(self.lora_up.weight, self.lora_down.weight)
            return self._forward_with(x, self.weight + self.scale * delta)
        y = super().forward(x)  # the base layer: W x + b
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)  # e.g. a bf16 base without autocast: branch in fp32
        h = self.lora_down(self.lora_dropout(x))  # (..., r) or (B, r, H', W')
        # in place, scale folded in: y is a fresh tensor the base layer does not keep for backward,
        # so this saves a full-size temporary and an elementwise pass per layer (bench.py: 2-6% per step)
        return y.add_(self.lora_up(h), alpha=self.scale)

    def _fold_is_cheaper(self, x):
        """Folding pays to form the update (out*r*K multiply-adds, K = in*k*k) and, in training, the frozen
        weight's gradient through the conv (N*out*K for N output positions); the branch pays
        N*r*(K + out) forward and twice that backward. So folding wins when the rank is close to the
        layer's width and the layer sees many positions: every layer of the tiny prior at rank 64
        (1.6x faster steps there), not SD's 320-1280-wide layers at rank 64."""
        if isinstance(self.lora_dropout, nn.Dropout) and self.training:
            return False  # dropout applies to the branch's input only
        if self.weight.dtype != self.lora_up.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return False  # a bf16 base without autocast: the branch runs in fp32 (see the class docstring)
        out, K, r = self.weight.shape[0], self.weight[0].numel(), self.rank
        n = x.numel() // self.weight.shape[1]  # input positions (tokens, or batch * pixels)
        if self.weight.dim() == 4:
            n //= math.prod(self.stride)        # output positions
        if torch.is_grad_enabled():
            return n * out * K + 3 * out * r * K < 3 * n * r * (K + out)
        return out * K < n * (K + out)          # no backward: out*r*K against N*r*(K + out), r cancels

    def _up_down(self, up, down):
        """up @ down shaped like W. For a conv the 1x1 up conv mixes the r output channels of the k x k
        down conv: dW[o, i, u, v] = sum_r up[o, r] * down[r, i, u, v]."""
        return (up.flatten(1) @ down.flatten(1)).view(self.weight.shape)  # (out, r) @ (r, in[*k*k])

    def delta_weight(self):
        """(alpha/r) * up @ down, shaped like W, in float64 (for merge and the file formats)."""
        up, down = self.lora_up.weight.detach().double(), self.lora_down.weight.detach().double()
        return self.scale * self._up_down(up, down)

    @torch.no_grad()
    def merge(self, keep_copy=True):
        """W <- W + dW; the branch is then skipped. keep_copy keeps a copy of W (one extra copy of
        this layer's weight in memory) so that unmerge is exact; inference can do without it."""
        if self.merged:
            return
        self.weight_before_merge = self.weight.detach().clone() if keep_copy else None
        self.weight.copy_((self.weight.double() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if self.weight_before_merge is None:
            raise RuntimeError("this LoRA was merged with keep_copy=False (for inference) and cannot be "
                               "unmerged: load the base model and the LoRA again")
        self.weight.copy_(self.weight_before_merge)
        self.weight_before_merge = None
        self.merged = False

    def extra_repr(self):
        return super().extra_repr() + f", lora_rank={self.rank}, lora_alpha={self.alpha:g}"


class LoRALinear(LoRALayer, nn.Linear):
    """An nn.Linear that shares `base`'s weight and bias and adds a rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        # build the nn.Linear shell on the meta device (no memory), then take over base's Parameters
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        dev = base.weight.device
        down = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        up = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=torch.float32)
        self._add_lora(down, up, rank, rank if alpha is None else alpha, dropout)
        self.train(base.training)

    def _forward_with(self, x, weight):
        return nn.functional.linear(x, weight, self.bias)


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """An nn.Conv2d that shares `base`'s weight and bias and adds a rank-r update:
    a k x k down conv with base's stride/padding/dilation, then a 1 x 1 up conv."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float | None = None, dropout: float = 0.0):
        if base.groups != 1:
            raise ValueError(f"LoRAConv2d supports groups=1 only, got a conv with groups={base.groups}")
        c_in, c_out = base.in_channels, base.out_channels
        super().__init__(c_in, c_out, base.kernel_size, base.stride, base.padding, base.dilation,
                         bias=base.bias is not None, padding_mode=base.padding_mode, device="meta")
        self.weight, self.bias = base.weight, base.bias
        dev = base.weight.device
        down = nn.Conv2d(c_in, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                         bias=False, padding_mode=base.padding_mode, device=dev, dtype=torch.float32)
        up = nn.Conv2d(rank, c_out, 1, bias=False, device=dev, dtype=torch.float32)
        self._add_lora(down, up, rank, rank if alpha is None else alpha, dropout)
        self.train(base.training)

    def _forward_with(self, x, weight):
        return self._conv_forward(x, weight, self.bias)


def lora_rank(rank, n_in, n_out):
    """rank: an int (the paper's 64) or a fraction of the layer width (the paper's 20%), which the
    official code turns into ceil(fraction * max(n_in, n_out)) per layer."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"LoRA rank must be an int >= 1 or a fraction in (0, 1], got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        return rank
    if not 0.0 < rank <= 1.0:
        raise ValueError(f"a fractional LoRA rank must lie in (0, 1], got {rank} (use an int for a fixed rank)")
    return math.ceil(rank * max(n_in, n_out))


# ----------------------------------------------------------------------------------------------
# Targets (LDM module names) and injection

# group -> module-path suffixes. A module is in a group when its path equals or ends with
# "." + suffix. Modules of a matching name that are not Linear/Conv2d (an nn.Identity skip
# connection) are left alone.
TARGETS = {
    "conv": ("in_layers.2", "out_layers.3", "skip_connection", "op", "conv"),  # ResBlock 3x3 convs,
    #        1x1 skip, Downsample's stride-2 conv, Upsample's conv. Never conv_in / conv_out.
    "attn": ("to_q", "to_k", "to_v"),  # self- and cross-attention projections (the official code)
    "attn_out": ("to_out.0",),  # attention output projection
    "ff": ("ff.net.0.proj", "ff.net.2"),  # feed-forward (GEGLU in-projection and out), biases kept
    "proj": ("proj_in", "proj_out"),  # SpatialTransformer in/out (Conv2d 1x1 in SD1, Linear in SD2;
    #        the official code counts SD1's as convs, here they are "proj" in both families)
}
DEFAULT_TARGETS = ("conv", "attn", "ff", "proj")  # the paper's "rank 64 on conv, attention, ff"
# The paper's two LoRA settings (Table 4), as target groups. Counted on SD2.1 (every layer's own rank):
#   small: rank 64 on conv + attn + ff + proj      61.5 M trained   (the paper: 62 M)
#   base:  20% on conv + attn + attn_out           217.3 M          (the paper: 222 M; + proj: 227.3 M,
#          q/k/v alone: 207.4 M; with ff as well, 445 M: twice the paper's, not its setting)
PRESETS = {"small": DEFAULT_TARGETS, "base": ("conv", "attn", "attn_out")}
PAPER_TRAINED = {"small": 62e6, "base": 222e6}     # the paper's Table 4 counts, for the printout


def parse_targets(spec, rank):
    """--lora-targets: a preset name or a comma list of TARGETS groups; None picks the paper's setting
    for the kind of rank (an int: 'small'; a fraction of the width: 'base'). -> (name, groups)."""
    if spec is None:
        spec = "base" if isinstance(rank, float) else "small"
    if spec in PRESETS:
        return spec, PRESETS[spec]
    groups = tuple(g for g in spec.split(",") if g)
    unknown = [g for g in groups if g not in TARGETS]
    if unknown or not groups:
        raise ValueError(f"--lora-targets {spec!r}: use a preset ({', '.join(PRESETS)}) or a comma list of "
                         f"{', '.join(TARGETS)}")
    return spec, groups
CONV_IN, CONV_OUT = "input_blocks.0.0", "out.2"  # LDM paths of the first and last conv: the
# official configs train these in full (full_train=(CONV_IN, CONV_OUT)); CONV_IN is the one that is
# widened 4 -> 8 channels for image-conditioned tasks.


def target_group(name):
    """The TARGETS group a module path belongs to, or None."""
    for group, suffixes in TARGETS.items():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            return group
    return None


def lora_layers(model):
    """(path, layer) for every LoRA layer in model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


def _wrap(module, rank, alpha, dropout):
    cls = LoRAConv2d if isinstance(module, nn.Conv2d) else LoRALinear
    return cls(module, rank, alpha, dropout)


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _set_trainable(model, full_train):
    """Freeze everything, then unfreeze the LoRA parameters and the modules trained in full."""
    model.requires_grad_(False)
    for _, m in lora_layers(model):
        m.lora_down.requires_grad_(True)
        m.lora_up.requires_grad_(True)
    for name in full_train:
        model.get_submodule(name).requires_grad_(True)


def inject_lora(model, rank, alpha=None, targets=DEFAULT_TARGETS, dropout=0.0, full_train=()):
    """Add LoRA to every Linear/Conv2d of `model` whose path is in one of `targets` (TARGETS keys).

    rank: int or fraction of the layer width (see lora_rank). alpha: None means alpha = rank per
    layer (scale 1, as the official code). full_train: module paths trained in full, e.g.
    (CONV_IN, CONV_OUT). Afterwards only LoRA and full_train parameters require grad.
    Returns the paths of the layers that got LoRA, in model order.
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target group(s) {unknown}; choose from {list(TARGETS)}")
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; inject once (load_lora fills existing ones)")
    modules = dict(model.named_modules())
    missing = [n for n in full_train if n not in modules]
    if missing:
        raise ValueError(f"full_train module(s) {missing} not found in the model (LDM names, e.g. {CONV_IN!r})")
    names = []
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or target_group(name) not in targets:
            continue
        if any(name == f or name.startswith(f + ".") for f in full_train):
            raise ValueError(f"{name} is both a LoRA target and trained in full; pick one")
        if isinstance(module, nn.Conv2d):
            n_in, n_out = module.in_channels, module.out_channels
        else:
            n_in, n_out = module.in_features, module.out_features
        _replace(model, name, _wrap(module, lora_rank(rank, n_in, n_out), alpha, dropout))
        names.append(name)
    if targets and not names:
        raise ValueError(f"no Linear/Conv2d module matched LoRA targets {tuple(targets)}; targets are "
                         f"LDM module names such as 'to_q' or 'in_layers.2' (see lora.TARGETS)")
    _set_trainable(model, full_train)
    return names


def merge_lora(model, keep_copy=True):
    """Fold every LoRA update into its base weight (W <- W + (alpha/r) up down). Exactly undone by
    unmerge_lora, unless keep_copy=False (no copy of the weights is kept: less memory, no unmerge).
    While merged the LoRA branches are skipped: use it for inference or export."""
    for _, m in lora_layers(model):
        m.merge(keep_copy)


def bake_lora(model):
    """Merge every LoRA into its weight for good and turn the layers back into plain nn.Linear/nn.Conv2d
    sharing the merged weights: a finetuned model to start something new from (train a new LoRA on it)."""
    for name, m in lora_layers(model):
        m.merge(keep_copy=False)
        if isinstance(m, nn.Conv2d):
            plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                              bias=m.bias is not None, padding_mode=m.padding_mode, device="meta")
        else:
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        _replace(model, name, plain.train(m.training))


def unmerge_lora(model):
    for _, m in lora_layers(model):
        m.unmerge()


def lora_state_dict(model):
    """The trainable parameters only (LoRA and full_train ones), under the model's own state-dict
    names, e.g. for a resumable training checkpoint; reload with model.load_state_dict(sd, strict=False)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# Files: kohya format + companion file

PREFIX = "lora_unet_"
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def kohya_name(path):
    """LDM module path -> kohya LoRA name: 'input_blocks.1.1.proj_in' -> 'lora_unet_input_blocks_1_1_proj_in'."""
    return PREFIX + path.replace(".", "_")


def companion_path(path):
    """'run/depth.safetensors' -> 'run/depth.full.safetensors' (the fully trained tensors)."""
    root, ext = os.path.splitext(str(path))
    return root + ".full" + (ext or ".safetensors")


def addnet_hashes(tensors, metadata):
    """The two hashes kohya's sd-scripts precompute for A1111 (sd-webui-additional-networks):
    sshs_model_hash = sha256 of the safetensors data section (all bytes after the 8-byte length
    and the JSON header), sshs_legacy_hash = first 8 hex digits of sha256 of bytes
    [0x100000, 0x110000) of the file, serialised with only the `ss_*` metadata (so that editing the
    user-facing keys does not change the hash). Returns (model_hash, legacy_hash)."""
    blob = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def lora_metadata(base, prediction_type, task=None, objective=None, zero_snr=False, resolution=None):
    """The facts a LoRA file cannot tell from its tensors, as the keys users' tools read.

    base: 'sd1' or 'sd2' (UNet family); prediction_type: 'eps' or 'v' (what the network predicts,
    unchanged by a diff2flow finetune, so stock samplers run it); zero_snr: whether sampling needs
    the zero-terminal-SNR rescaled schedule (kohya's ss_zero_terminal_snr, ComfyUI's zsnr);
    task/objective: free strings recorded as diff2flow.* keys (an `fm` objective changes the output
    to a velocity, which only this project's sampler runs)."""
    if base not in ("sd1", "sd2"):
        raise ValueError(f"base must be 'sd1' or 'sd2', got {base!r}")
    if prediction_type not in ("eps", "v"):
        raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")
    v2, v = base == "sd2", prediction_type == "v"
    arch = "stable-diffusion-v1" if not v2 else ("stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512")
    res = resolution or (768 if v2 and v else 512)
    meta = {
        "ss_base_model_version": ("sd_v2" if v2 else "sd_v1") + ("_v" if v else ""),  # kohya's spelling
        "ss_v2": str(v2),
        "ss_zero_terminal_snr": str(bool(zero_snr)),
        "modelspec.architecture": arch + "/lora",
        "modelspec.prediction_type": "v" if v else "epsilon",
        "modelspec.resolution": f"{res}x{res}",
        "diff2flow.base": base,
        "diff2flow.prediction_type": prediction_type,
        "diff2flow.zero_snr": str(bool(zero_snr)),
    }
    if task is not None:
        meta["diff2flow.task"] = str(task)
    if objective is not None:
        meta["diff2flow.objective"] = str(objective)
    return meta


def _atomic_save(tensors, path, metadata):
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def _input_channels(model):
    conv = dict(model.named_modules()).get(CONV_IN)
    return conv.in_channels if isinstance(conv, nn.Conv2d) else None


def save_lora(path, model, metadata=None, dtype=torch.float32):
    """Write model's LoRA in kohya format to `path` and its fully trained parameters (those that
    require grad and are not LoRA) to companion_path(path); a stale companion file is removed.
    metadata: extra string keys (e.g. from lora_metadata). Returns the metadata written."""
    layers = lora_layers(model)
    if len({kohya_name(n) for n, _ in layers}) != len(layers):
        raise ValueError("two LoRA module paths give the same kohya name (they differ only in '.' vs '_')")
    # One alpha for every layer, the top-rank layer's (kohya's ss_network_alpha). A layer with another
    # alpha (a fractional rank with alpha = rank per layer) gets its ratio folded into up: then
    # (alpha_file / r) * up' @ down = (alpha / r) * up @ down, the same function. Readers differ in how
    # they take per-layer alphas (diffusers 0.42 gives every attention projection the file's most common
    # one: SD1's output 11% off at rank 0.2, issue #22), and all of them read a uniform alpha alike.
    top = max(layers, key=lambda nm: nm[1].rank)[1] if layers else None
    tensors = {}
    for name, m in layers:
        key = kohya_name(name)
        up = m.lora_up.weight.detach()
        if m.alpha != top.alpha and top.alpha != 0:
            up = up.double() * (m.alpha / top.alpha)
        tensors[key + ".lora_down.weight"] = m.lora_down.weight.detach().to("cpu", dtype).contiguous()
        tensors[key + ".lora_up.weight"] = up.to("cpu", dtype).contiguous()
        tensors[key + ".alpha"] = torch.tensor(top.alpha if top.alpha != 0 else m.alpha, dtype=torch.float32)
    lora_ids = {id(p) for _, m in layers for p in (m.lora_down.weight, m.lora_up.weight)}
    full = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in lora_ids}
    if not tensors and not full:
        raise ValueError("nothing to save: the model has no LoRA layers and no trainable parameters")

    # kohya's ss_network_dim is a single number; with a fractional rank the layers differ: write the largest
    groups = sorted({target_group(n) for n, _ in layers} - {None})
    ranks = sorted({m.rank for _, m in layers})
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(top.rank if top else 0),
        "ss_network_alpha": f"{top.alpha:g}" if top else "0",
        "modelspec.sai_model_spec": "1.0.0",
        # the keys follow the original (Stability) UNet's module names, not diffusers'
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": os.path.splitext(os.path.basename(str(path)))[0],
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "diff2flow.targets": ",".join(groups),
        "diff2flow.rank": ",".join(map(str, ranks)) if len(ranks) < 4 else f"{ranks[0]}..{ranks[-1]}",
        "diff2flow.full_train": ",".join(sorted(full)),
    }
    if _input_channels(model) is not None:
        meta["diff2flow.unet_in_channels"] = str(_input_channels(model))
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    model_hash, legacy_hash = addnet_hashes(tensors, meta)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash, legacy_hash
    meta["modelspec.hash_sha256"] = "0x" + model_hash

    _atomic_save(tensors, path, meta)
    side = companion_path(path)
    if full:
        _atomic_save(full, side, meta)
    elif os.path.exists(side):
        os.remove(side)
    return meta


def read_metadata(path):
    """The safetensors metadata of a LoRA file (no tensors read): what sampling needs to know
    (prediction type, zero-SNR, task, objective, UNet input channels) before building the model."""
    return _read(path, tensors=False)[1]


def _read(path, tensors=True):
    """(tensors, metadata) of a safetensors file; a truncated or corrupt file is one ValueError line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), (f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for short files and bad headers
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable .safetensors file (truncated or corrupt? {reason}): "
                         f"write it again, or use another checkpoint of the run (its ckpt_* folders)") from None


def load_lora(path, model):
    """Apply a kohya-format LoRA file (and its companion file, when present) to `model`.

    Layers named in the file get LoRA (rank from the tensors, scale from .alpha) if they have none,
    else the file's values are copied into the existing LoRA layers (resume). Everything is checked
    before the model is touched; a mismatch raises ValueError naming the keys. Afterwards only LoRA
    and companion-file parameters require grad. Returns the file's metadata.
    """
    tensors, meta = _read(path)
    side = companion_path(path)
    full, side_meta = _read(side) if os.path.exists(side) else ({}, {})
    # the companion records the hash of the LoRA it was saved with: a pair from two saves is refused
    mine, theirs = meta.get("sshs_model_hash"), side_meta.get("sshs_model_hash")
    if mine and theirs and mine != theirs:
        raise ValueError(f"{side} belongs to another save than {path} (step {side_meta.get('diff2flow.step', '?')} "
                         f"vs {meta.get('diff2flow.step', '?')}): load the run folder (its newest complete "
                         f"checkpoint) or a pair from one ckpt_* folder")

    # 1. the input-conv width: a depth LoRA (8 channels) on a 4-channel base is refused by name
    want, have = meta.get("diff2flow.unet_in_channels"), _input_channels(model)
    if want is not None and have is not None and int(want) != have:
        raise ValueError(f"{path} was trained on a UNet with {want} input channels "
                         f"(task {meta.get('diff2flow.task', '?')}), the model has {have}: load it onto a model "
                         f"built for that task (in code: widen the input conv {CONV_IN} to {want} channels first)")

    # 2. group the file's keys by module and check they name Linear/Conv2d layers of this model
    by_key = {kohya_name(n): (n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    bad = [k for k in tensors if not k.startswith(PREFIX) or not k.endswith(LORA_SUFFIXES)]
    if bad:
        raise ValueError(f"{path}: not kohya LoRA keys (lora_unet_*.lora_down.weight/.lora_up.weight/"
                         f".alpha): {bad[:5]}")
    entries = {}
    for k in tensors:
        stem = next(k[: -len(s)] for s in LORA_SUFFIXES if k.endswith(s))
        entries.setdefault(stem, {})[k[len(stem) + 1:]] = tensors[k]
    absent = [s for s in entries if s not in by_key]
    if absent:
        raise ValueError(f"{path}: {len(absent)} LoRA module(s) do not exist in this model, e.g. "
                         f"{absent[:3]} (a LoRA for another UNet layout?)")

    # 3. shapes: down (r, in[, k, k]) and up (out, r[, 1, 1]) must fit the layer
    plan = []
    for stem, e in entries.items():
        name, m = by_key[stem]
        if "lora_down.weight" not in e or "lora_up.weight" not in e:
            raise ValueError(f"{path}: {stem} lacks lora_down.weight or lora_up.weight")
        down, up = e["lora_down.weight"], e["lora_up.weight"]
        r = down.shape[0]
        if isinstance(m, nn.Conv2d):
            want_down = (r, m.in_channels, *m.kernel_size)
            want_up = (m.out_channels, r, 1, 1)
        else:
            want_down, want_up = (r, m.in_features), (m.out_features, r)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise ValueError(f"{path}: {stem} has down {tuple(down.shape)} / up {tuple(up.shape)}, but "
                             f"layer {name} needs {want_down} / {want_up} (a LoRA for another base model?)")
        alpha = float(e["alpha"]) if "alpha" in e else float(r)  # kohya: no alpha means scale 1
        plan.append((name, m, down, up, r, alpha))

    # 4. the companion file: state-dict names of this model, same shapes
    params = dict(model.named_parameters())
    for k, v in full.items():
        if k not in params:
            raise ValueError(f"{side}: parameter {k} does not exist in this model")
        if tuple(v.shape) != tuple(params[k].shape):
            raise ValueError(f"{side}: {k} has shape {tuple(v.shape)}, the model's is "
                             f"{tuple(params[k].shape)} (widen the input conv / another base model?)")

    # 5. apply
    with torch.no_grad():
        for name, m, down, up, r, alpha in plan:
            if isinstance(m, LoRALayer):
                m.unmerge()  # the file's values replace the current ones; merge again after loading
            if not isinstance(m, LoRALayer) or m.rank != r:  # new, or another rank: (re)build on the same W
                m = _wrap(m, r, alpha, 0.0)
                _replace(model, name, m)
            m.alpha, m.scale = alpha, alpha / r
            m.lora_down.weight.copy_(down)
            m.lora_up.weight.copy_(up)
        for k, v in full.items():
            params[k].copy_(v)
    _set_trainable(model, ())
    for k in full:
        params[k].requires_grad_(True)
    return meta
