"""
The text encoders of SD1 and SD2, built from open_clip's text tower only (no 4 GB vision tower).

    |               | SD 1.x                               | SD 2.x                                |
    |---------------|--------------------------------------|---------------------------------------|
    | model         | OpenAI CLIP ViT-L/14 (width 768)     | OpenCLIP ViT-H/14 (width 1024)        |
    | keys in file  | cond_stage_model.transformer.        | cond_stage_model.model.*              |
    |               |   text_model.* (HF transformers)     |   (open_clip's own names)             |
    | activation    | QuickGELU x*sigmoid(1.702x)          | GELU                                  |
    | output        | last layer, then final LayerNorm     | penultimate layer, then ln_final      |
    | padding token | end-of-text 49407                    | 0                                     |
    | context       | all 77 tokens, (B, 77, 768)          | all 77 tokens, (B, 77, 1024)          |

The module's own state dict uses open_clip's names under `model.` (so SD2's `cond_stage_model.`
keys load verbatim). SD1's HF CLIP names are mapped by `hf_clip_to_open_clip` (the one renaming
function in the project: HF keeps q/k/v separate where open_clip fuses them into `in_proj`).
Tokenizer: open_clip's SimpleTokenizer, whose BPE vocabulary ships inside the package (no download).
"""
from dataclasses import dataclass
import math

import torch
import torch.nn as nn
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

SOT, EOT = 49406, 49407  # CLIP's start- and end-of-text tokens


@dataclass
class TextConfig:
    width: int = 1024
    heads: int = 16                   # not in the file: open_clip's rule is width // 64
    layers: int = 24
    mlp_ratio: float = 4.0
    vocab_size: int = 49408
    context_length: int = 77
    quick_gelu: bool = False          # SD1 (OpenAI CLIP): True
    skip_last: int = 1                # 1 = penultimate layer (SD2), 0 = last layer (SD1)
    pad_id: int = 0                   # SD2: 0, SD1: end-of-text 49407
    projection_dim: int = 1024        # text_projection (SD2 files carry it; unused for conditioning); 0 = none
    logit_scale: bool = True          # SD2 files carry CLIP's logit_scale (unused); kept so files round-trip
    layout: str = "open_clip"         # key names in the checkpoint: "open_clip" (SD2) or "hf" (SD1)


SD2_TEXT = TextConfig()
SD1_TEXT = TextConfig(width=768, heads=12, layers=12, quick_gelu=True, skip_last=0, pad_id=EOT,
                      projection_dim=0, logit_scale=False, layout="hf")

_tokenizer = None


def tokenize(prompts, pad_id, context_length=77):
    """List of strings -> (B, context_length) int64: [SOT, BPE tokens (truncated), EOT, pad_id, ...]."""
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = SimpleTokenizer(context_length=context_length)
    out = torch.full((len(prompts), context_length), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [SOT] + _tokenizer.encode(p)[: context_length - 2] + [EOT]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig = SD2_TEXT):
        super().__init__()
        self.cfg = cfg
        self.model = TextTransformer(
            context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width, heads=cfg.heads,
            layers=cfg.layers, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.projection_dim,
            proj_type="linear" if cfg.projection_dim else "none",
            act_layer=QuickGELU if cfg.quick_gelu else nn.GELU, norm_layer=LayerNorm)
        self.model.attn_mask = None  # forward builds its own causal mask (nothing stale when built on meta)
        if cfg.logit_scale:
            self.model.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, tokens):  # (B, L) int64 -> (B, L, width)
        m, L = self.model, tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:L]  # (B, L, width)
        causal = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)  # token i sees 0..i
        blocks = m.transformer.resblocks
        for block in blocks[: len(blocks) - self.cfg.skip_last]:
            x = block(x, attn_mask=causal)  # (B, L, width)
        return m.ln_final(x)

    @torch.no_grad()
    def encode(self, prompts):
        """List of prompts -> the UNet's cross-attention context, (B, 77, width)."""
        tokens = tokenize(prompts, self.cfg.pad_id, self.cfg.context_length)
        return self(tokens.to(self.model.token_embedding.weight.device))


# ----------------------------------------------------------------------------- configs and SD1's key mapping

def text_config_from_state_dict(sd, layout, heads=None):
    """TextConfig from the shapes of a text-encoder state dict, keys without the file's prefix
    (`cond_stage_model.model.` for layout "open_clip", `cond_stage_model.transformer.text_model.` for "hf")."""
    def need(key):
        if key not in sd:
            raise ValueError(f"not a CLIP text encoder ({layout} names): no '{key}' (first keys found: {', '.join(list(sd)[:5])})")
        return sd[key]

    def head_count(width):
        """The file cannot tell the heads: open_clip's rule width // 64, unless the metadata gives them."""
        if heads is None and width % 64:
            raise ValueError(f"text encoder of width {width}, not a multiple of 64: its head count cannot be "
                             f"inferred (width // 64); write it into the checkpoint's metadata as "
                             f"diff2flow.text_heads (a divisor of {width})")
        n = heads or width // 64
        if n < 1 or width % n:
            raise ValueError(f"diff2flow.text_heads {n} does not divide the text encoder's width {width}: fix that "
                             f"metadata key of the checkpoint")
        return n

    if layout == "hf":
        tok, fc1 = need("embeddings.token_embedding.weight"), need("encoder.layers.0.mlp.fc1.weight")
        layers = sum(1 for k in sd if k.startswith("encoder.layers.") and k.endswith(".layer_norm1.weight"))
        width = tok.shape[1]
        return TextConfig(width=width, heads=head_count(width), layers=layers, mlp_ratio=fc1.shape[0] / width,
                          vocab_size=tok.shape[0], context_length=need("embeddings.position_embedding.weight").shape[0],
                          quick_gelu=True, skip_last=0, pad_id=EOT, projection_dim=0, logit_scale=False, layout="hf")
    tok, fc = need("token_embedding.weight"), need("transformer.resblocks.0.mlp.c_fc.weight")
    layers = sum(1 for k in sd if k.startswith("transformer.resblocks.") and k.endswith(".ln_1.weight"))
    width = tok.shape[1]
    return TextConfig(width=width, heads=head_count(width), layers=layers, mlp_ratio=fc.shape[0] / width,
                      vocab_size=tok.shape[0], context_length=need("positional_embedding").shape[0],
                      projection_dim=sd["text_projection"].shape[1] if "text_projection" in sd else 0,
                      logit_scale="logit_scale" in sd, layout="open_clip")


def _sd1_names(layers):
    """(HF CLIP name, TextEncoder name) of every SD1 text tensor except the attention's q/k/v."""
    pairs = [("embeddings.token_embedding.weight", "model.token_embedding.weight"),
             ("embeddings.position_embedding.weight", "model.positional_embedding"),
             ("final_layer_norm.weight", "model.ln_final.weight"), ("final_layer_norm.bias", "model.ln_final.bias")]
    for i in range(layers):
        for hf, oc in [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                       ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
            for p in ("weight", "bias"):
                pairs.append((f"encoder.layers.{i}.{hf}.{p}", f"model.transformer.resblocks.{i}.{oc}.{p}"))
    return pairs


def hf_clip_to_open_clip(sd, layers):
    """SD1's text keys (HF CLIP names, without `cond_stage_model.transformer.text_model.`) -> TextEncoder
    keys. One for one, except that open_clip stacks W_q, W_k, W_v into one `in_proj` (3 width, width).
    HF's `embeddings.position_ids` buffer (always arange(77)) is not needed."""
    out = {oc: sd[hf] for hf, oc in _sd1_names(layers)}
    for i in range(layers):
        for p in ("weight", "bias"):
            qkv = [sd[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"]
            out[f"model.transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(qkv, dim=0)
    return out


def open_clip_to_hf_clip(sd, layers):
    """The inverse of hf_clip_to_open_clip (for writing SD1 files)."""
    out = {hf: sd[oc] for hf, oc in _sd1_names(layers)}
    for i in range(layers):
        for p in ("weight", "bias"):
            for x, w in zip("qkv", sd[f"model.transformer.resblocks.{i}.attn.in_proj_{p}"].chunk(3, dim=0)):
                out[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] = w.contiguous()
    return out
