"""
The one reader and writer of Stable Diffusion single-file checkpoints (.safetensors; .ckpt read-only).

    | key prefix in the file                         | module                   | how it loads          |
    |------------------------------------------------|--------------------------|-----------------------|
    | model.diffusion_model.*                        | unet.UNetModel           | verbatim, strict      |
    | first_stage_model.*                            | vae.AutoencoderKL        | verbatim, strict      |
    | cond_stage_model.model.*                 (SD2) | text_encoder.TextEncoder | verbatim, strict      |
    | cond_stage_model.transformer.text_model.*(SD1) | text_encoder.TextEncoder | hf_clip_to_open_clip  |
    | empty_context  (1, 77, context_dim) tensor     | only in files without a text encoder (the tiny prior) |
Every other key (EMA copies `model_ema.*`, LDM's schedule buffers `betas`, `alphas_cumprod`, ...) is
left unread and listed in SDCheckpoint.ignored.

What the tensors cannot tell travels in the safetensors string metadata:
    | metadata key                   | meaning                                                            |
    |--------------------------------|--------------------------------------------------------------------|
    | diff2flow.prediction_type      | "eps", "v" or "x0"; else modelspec.prediction_type ("epsilon",    |
    |                                | "v"); else eps for SD1, v for SD2 768-v; the caller's argument wins |
    | diff2flow.unet_num_heads       | UNet heads (-1: use channels per head); without it SD's rule       |
    | diff2flow.unet_num_head_channels | UNet channels per head (-1: use num_heads)                     |
    | diff2flow.text_heads           | text-encoder heads; without it width // 64 (open_clip's rule)      |
The writer fills in the head keys itself; the keys train.py adds (objective, zero-SNR, task) pass through.

.ckpt files are read only with torch.load(weights_only=True), never weights_only=False. Lightning
saved its ModelCheckpoint callback into old SD .ckpt files; that one class is let through as an empty
stand-in. Anything else pickled in a file is refused with the advice to convert to .safetensors.
"""
from dataclasses import dataclass, field, replace
import os
import pickle
import re
import shutil
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora import companion_path
from text_encoder import TextEncoder, hf_clip_to_open_clip, open_clip_to_hf_clip, text_config_from_state_dict
from unet import SD1_UNET, SD2_UNET, UNetModel, unet_config_from_state_dict
from vae import TAESD, AutoencoderKL, vae_config_from_state_dict

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."                   # open_clip names
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."  # HF CLIP names
EMPTY_CONTEXT_KEY = "empty_context"
PREDICTIONS = ("eps", "v", "x0")
DEFAULT_PREDICTION = {"sd1": "eps", "sd2": "v"}
TINY_PRIOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_prior.safetensors")
SD_FILENAMES = ("v2-1_768-ema-pruned.safetensors", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors")


# ----------------------------------------------------------------------------- reading files

class _LightningCallbackStub:
    """Stands in for pytorch_lightning's ModelCheckpoint pickled into old .ckpt files; its state is dropped."""
    def __setstate__(self, state):
        pass


_ALLOWED_GLOBALS = [(_LightningCallbackStub, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
                    (_LightningCallbackStub, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")]


def read_state_dict(path):
    """(flat state dict, string metadata) of a .safetensors or .ckpt/.pt/.pth file, with one-line errors."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "model_index.json")) or os.path.isdir(os.path.join(path, "unet")):
            raise ValueError(f"{path} is a diffusers-format folder (model_index.json, unet/, vae/); this project reads "
                             "the original single-file checkpoints (e.g. v2-1_768-ema-pruned.safetensors): download "
                             "that file, or convert the folder with diffusers' convert_diffusers_to_original_stable_diffusion.py")
        raise ValueError(f"{path} is a folder; pass a checkpoint file (.safetensors or .ckpt)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(path), metadata
        except Exception as e:  # safetensors raises its own error types for bad headers and short files
            raise ValueError(f"{path} is not a valid .safetensors file (truncated or corrupt? {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); download it again") from None
    if not path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise ValueError(f"{path}: unknown checkpoint extension; expected .safetensors or .ckpt")
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise ValueError(f"{path} contains a pickled Python object ({found.group(1)}); for safety it is never "
                             "unpickled. If the file comes from a trusted source, convert it to .safetensors") from None
        inner = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", str(e), re.S)
        reason = " ".join((inner.group(1) if inner else str(e).split(". ")[0] or type(e).__name__).split())
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated or corrupt? {reason})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        found = f"keys {list(obj)[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(f"{path} holds no flat state dict of tensors (found {found})")
    return sd, {}


def _first(names, n=5):
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def check_state_dict(expected, sd, what, prefix=""):
    """Compare a state dict with the expected one, nanoGPT style: missing and unexpected key names
    (first few, with the file's prefix), or the first key whose shape differs and both shapes."""
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if missing or unexpected:
        msg = [f"{what}: the file's keys do not match the model built from its shapes"]
        if missing:
            msg.append(f"missing {_first(prefix + k for k in missing)}")
        if unexpected:
            msg.append(f"unexpected {_first(prefix + k for k in unexpected)}")
        raise ValueError("; ".join(msg))
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"{what}: shape mismatch for {prefix + k}: file has {tuple(sd[k].shape)}, "
                             f"model expects {tuple(v.shape)}")


def load_strict(module, sd, what, prefix=""):
    """check_state_dict, then module.load_state_dict(strict=True, assign=True) (module built on meta)."""
    check_state_dict(module.state_dict(), sd, what, prefix)
    module.load_state_dict(sd, strict=True, assign=True)
    return module


# ----------------------------------------------------------------------------- the loader

@dataclass
class SDCheckpoint:
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder = None  # None for files without one (the tiny prior) or with_text_encoder=False
    family: str = "tiny"              # "sd1" | "sd2" (the released architectures) | "tiny" (any other SD-shaped config)
    prediction: str = "eps"           # "eps" | "v" | "x0": what the UNet outputs
    metadata: dict = field(default_factory=dict)  # the file's safetensors string metadata ({} for .ckpt)
    path: str = ""
    ignored: list = field(default_factory=list)  # keys no module uses (EMA copies, schedule buffers, ...)
    _empty: torch.Tensor = None

    def empty_context(self):
        """The empty prompt's embedding (1, 77, context_dim): the cross-attention input of unconditional
        and image-conditioned tasks. From the file (tiny prior), else computed once by the checkpoint's own
        text encoder and cached beside the checkpoint as <name>.empty_context.safetensors."""
        if self._empty is None:
            self._empty = _cached_empty_context(self.path, self.text_encoder)
        p = next(self.unet.parameters())
        return self._empty.to(p.device, p.dtype)


def _family(cfg):
    base = replace(cfg, in_channels=4, attn_fp32=False, use_checkpoint=False)  # a widened input is still SD
    return "sd1" if base == SD1_UNET else "sd2" if base == SD2_UNET else "tiny"


def _cached_empty_context(path, text_encoder):
    cache = os.path.splitext(path)[0] + ".empty_context.safetensors"
    st = os.stat(path)
    stamp = {"source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns)}
    if os.path.exists(cache):
        try:
            with safe_open(cache, framework="pt") as f:
                if dict(f.metadata() or {}) == stamp:
                    return f.get_tensor(EMPTY_CONTEXT_KEY)
        except Exception:
            pass  # unreadable or stale: recompute below
    if text_encoder is None:
        raise ValueError(f"{path} has neither a text encoder nor an '{EMPTY_CONTEXT_KEY}' tensor; "
                         "the empty-prompt embedding cannot be computed")
    empty = text_encoder.encode([""]).float().cpu().contiguous()  # (1, 77, C)
    try:
        _atomic_save({EMPTY_CONTEXT_KEY: empty}, cache, stamp)
    except OSError as e:
        warnings.warn(f"could not cache the empty-prompt embedding at {cache} ({e}); it is recomputed next time")
    return empty


def load_sd_checkpoint(path, prediction=None, device="cpu", dtype=torch.float32, with_text_encoder=True):
    """Load an SD1/SD2-layout single-file checkpoint (or any smaller config in the same layout).
    prediction: "eps" | "v" | "x0", overriding the file's metadata and the family default (SD1 eps,
    SD2 v; SD 2.x *base* 512 models are eps: pass prediction="eps"). with_text_encoder=False skips
    building the text encoder (the empty-prompt embedding is then resolved right away).
    Modules come back in eval mode on `device` in `dtype` (None keeps the file's dtypes).
    Runtime UNet options (attn_fp32, use_checkpoint): ckpt.unet.set_options(...)."""
    path = os.fspath(path)
    sd, metadata = read_state_dict(path)
    keys = list(sd)
    if any(k.startswith("conditioner.embedders.") for k in keys) or UNET_PREFIX + "label_emb.0.0.weight" in sd:
        raise ValueError(f"{path} is an SDXL checkpoint (conditioner.embedders.*, label_emb); only SD1.x/SD2.x are supported")
    if UNET_PREFIX + "input_blocks.0.0.weight" not in sd:
        if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys):
            raise ValueError(f"{path} holds diffusers-format weights (keys like {_first(keys, 2)}); pass the original "
                             "single-file checkpoint (model.diffusion_model.*, first_stage_model.*)")
        prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
        raise ValueError(f"{path} is not an SD1/SD2 single-file checkpoint: no {UNET_PREFIX}input_blocks.0.0.weight "
                         f"(found key prefixes: {_first(prefixes, 8)})")
    in_ch = sd[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1]
    if in_ch == 9:
        raise ValueError(f"{path} is a 9-channel inpainting UNet (input_blocks.0.0.weight takes 9 channels); "
                         "not supported, use the base model")

    def part(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    def meta_int(key):
        return int(metadata[key]) if key in metadata else None

    used = (UNET_PREFIX, VAE_PREFIX, SD1_TEXT_PREFIX, SD2_TEXT_PREFIX)
    ignored = [k for k in keys if not k.startswith(used) and k != EMPTY_CONTEXT_KEY]
    stray = [k for k in ignored if k.startswith("cond_stage_model.")]
    if stray:
        raise ValueError(f"{path}: unknown text-encoder layout ({_first(stray, 3)}); expected "
                         f"{SD1_TEXT_PREFIX}* (SD1) or {SD2_TEXT_PREFIX}* (SD2)")

    # UNet
    unet_sd = part(UNET_PREFIX)
    cfg = unet_config_from_state_dict(unet_sd, num_heads=meta_int("diff2flow.unet_num_heads"),
                                      num_head_channels=meta_int("diff2flow.unet_num_head_channels"))
    with torch.device("meta"):
        unet = UNetModel(cfg)
    load_strict(unet, unet_sd, f"{path}: UNet", UNET_PREFIX)
    family = _family(unet.cfg)

    # autoencoder
    vae_sd = part(VAE_PREFIX)
    if not vae_sd:
        raise ValueError(f"{path} has no autoencoder ({VAE_PREFIX}*)")
    with torch.device("meta"):
        vae = AutoencoderKL(vae_config_from_state_dict(vae_sd))
    load_strict(vae, vae_sd, f"{path}: autoencoder", VAE_PREFIX)

    # text encoder: SD2 (open_clip names) verbatim, SD1 (HF CLIP names) through the one mapping
    text = None
    for prefix, layout in ((SD2_TEXT_PREFIX, "open_clip"), (SD1_TEXT_PREFIX, "hf")):
        text_sd = part(prefix)
        if not text_sd:
            continue
        tcfg = text_config_from_state_dict(text_sd, layout, heads=meta_int("diff2flow.text_heads"))
        with torch.device("meta"):
            text = TextEncoder(tcfg)
        what = f"{path}: text encoder"
        if layout == "open_clip":
            load_strict(text, {"model." + k: v for k, v in text_sd.items()}, what, "cond_stage_model.")
        else:
            text_sd.pop("embeddings.position_ids", None)  # always arange(77); merged files often carry a corrupted copy
            check_state_dict(open_clip_to_hf_clip(text.state_dict(), tcfg.layers), text_sd, what, prefix)  # file's names
            load_strict(text, hf_clip_to_open_clip(text_sd, tcfg.layers), what)
        if unet.cfg.context_dim != tcfg.width:
            raise ValueError(f"{path}: text encoder width {tcfg.width} does not match the UNet's context_dim {unet.cfg.context_dim}")

    empty = sd.get(EMPTY_CONTEXT_KEY)
    if empty is not None and (empty.ndim != 3 or empty.shape[-1] != unet.cfg.context_dim):
        raise ValueError(f"{path}: '{EMPTY_CONTEXT_KEY}' has shape {tuple(empty.shape)}, expected (1, 77, {unet.cfg.context_dim})")

    modelspec = {"epsilon": "eps", "v": "v"}.get(metadata.get("modelspec.prediction_type"))
    prediction = prediction or metadata.get("diff2flow.prediction_type") or modelspec or DEFAULT_PREDICTION.get(family)
    if prediction not in PREDICTIONS:
        raise ValueError(f"{path}: prediction type {'unknown' if prediction is None else repr(prediction)} "
                         f"(a {family} model without 'diff2flow.prediction_type' metadata); pass prediction= one of {PREDICTIONS}")

    for m in (unet, vae, text):
        if m is not None:
            m.to(device=device, dtype=dtype).eval()
    ckpt = SDCheckpoint(unet, vae, text, family, prediction, metadata, path, ignored, empty)
    if not with_text_encoder:
        if empty is None:
            ckpt._empty = _cached_empty_context(path, text)
        ckpt.text_encoder = None
    return ckpt


# ----------------------------------------------------------------------------- finding one

def find_checkpoint(path):
    """The checkpoint to finetune: the given path, a known SD file nearby, or the bundled tiny prior."""
    if path is not None:
        return path, False
    for folder in (".", "checkpoints"):
        for name in SD_FILENAMES:
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name), False
    if not os.path.exists(TINY_PRIOR):
        raise FileNotFoundError(f"no SD checkpoint given (--ckpt) or found, and the bundled tiny prior "
                                f"{TINY_PRIOR} is missing: restore it from git or pass --ckpt")
    return TINY_PRIOR, True


# ----------------------------------------------------------------------------- the writer

def _atomic_save(tensors, path, metadata):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_sd_checkpoint(path, unet, vae, text_encoder=None, empty_context=None, metadata=None):
    """Write unet, vae (and text_encoder or the empty-prompt embedding) as one SD single-file
    .safetensors in the original layout (see the table at the top), atomically. metadata: str -> str
    (e.g. {"diff2flow.prediction_type": "v"}); the head rules are added here."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: checkpoints are written as .safetensors only")
    meta = {"diff2flow.unet_num_heads": str(unet.cfg.num_heads),
            "diff2flow.unet_num_head_channels": str(unet.cfg.num_head_channels)}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str; got {k!r}: {type(v).__name__}")
        meta[k] = v
    sd = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    if text_encoder is not None:
        meta["diff2flow.text_heads"] = str(text_encoder.cfg.heads)
        tsd = text_encoder.state_dict()
        if text_encoder.cfg.layout == "hf":
            hf = open_clip_to_hf_clip(tsd, text_encoder.cfg.layers)
            hf["embeddings.position_ids"] = torch.arange(text_encoder.cfg.context_length)[None]  # as in SD1.5's files
            sd.update({SD1_TEXT_PREFIX + k: v for k, v in hf.items()})
        else:
            sd.update({"cond_stage_model." + k: v for k, v in tsd.items()})  # TextEncoder keys start with "model."
    if empty_context is not None:
        if empty_context.ndim != 3 or empty_context.shape[-1] != unet.cfg.context_dim:
            raise ValueError(f"empty_context has shape {tuple(empty_context.shape)}, expected (1, 77, {unet.cfg.context_dim})")
        sd[EMPTY_CONTEXT_KEY] = empty_context
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    _atomic_save(sd, path, meta)


# ----------------------------------------------------------------------------- TAESD weights

def load_taesd(encoder_path, decoder_path=None, device="cpu", dtype=torch.float32):
    """TAESD from the released taesd_encoder.pth / taesd_decoder.pth (or their .safetensors), or from one
    file holding both under `encoder.` / `decoder.` (what TAESD().state_dict() writes)."""
    with torch.device("meta"):
        taesd = TAESD()
    if decoder_path is None:
        load_strict(taesd, read_state_dict(encoder_path)[0], f"{encoder_path}: TAESD")
    else:
        load_strict(taesd.encoder, read_state_dict(encoder_path)[0], f"{encoder_path}: TAESD encoder")
        load_strict(taesd.decoder, read_state_dict(decoder_path)[0], f"{decoder_path}: TAESD decoder")
    return taesd.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- run folders (train.py writes, sample.py reads)
#
#   runs/depth/ckpt_000200/{lora.safetensors, lora.full.safetensors, state.pt}   one complete checkpoint
#   runs/depth/ckpt_000400/...                                                   the newest KEEP_CHECKPOINTS
#   runs/depth/latest                   "ckpt_000400": the checkpoint to read, replaced atomically
#   runs/depth/lora.safetensors (+ .full)   hard links to latest's files, for other tools and --init-lora
#   runs/depth/log.jsonl, preview_*.png
#
# Why this layout: a checkpoint is several files (the LoRA, its companion of fully trained convs, the
# optimizer state), and no file system renames several files at once. So each set is written into a
# temporary folder `ckpt_000400.tmp<pid>`, which is renamed to `ckpt_000400` only when every file is
# written (one atomic rename: a folder of that name is always complete), and then `latest` is switched
# to it with os.replace. A kill at any moment leaves `latest` naming a complete set (the old or the new
# one), so --resume and sample.py --run read the files of one step. The top-level LoRA pair is a
# convenience copy (hard links: no extra disk) published after the switch; a kill between its two
# files can leave them from two steps, which load_lora refuses by the LoRA hash the companion records,
# and the next save or --resume republishes them. Old sets are renamed `.del<pid>` before deletion, so
# a half-deleted folder never looks complete. Temporary names carry the writer's pid: on start,
# train.py removes those of processes that no longer run.

RUN_LORA, RUN_STATE, RUN_LATEST = "lora.safetensors", "state.pt", "latest"
KEEP_CHECKPOINTS = 2      # the newest sets kept in a run folder (each holds the optimizer state: large on SD)
STEP_DIR = re.compile(r"ckpt_(\d+)$")
STALE_NAME = re.compile(r"\.(?:tmp|del)(\d+)(?:\.|$)")


def step_dir(run, step):
    return os.path.join(run, f"ckpt_{step:06d}")


def _complete_sets(run):
    """{step: folder} of the complete checkpoint folders in run (temporary and half-deleted ones excluded)."""
    found = {}
    for name in os.listdir(run) if os.path.isdir(run) else ():
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(run, name, RUN_LORA)):
            found[int(m.group(1))] = os.path.join(run, name)
    return found


def latest_checkpoint(run):
    """The folder of run's newest complete checkpoint: the one `latest` names; without a readable
    pointer (none written yet, or its folder deleted by hand) the complete set of the highest step.
    None when the run has no checkpoint."""
    try:
        with open(os.path.join(run, RUN_LATEST)) as f:
            name = f.read().strip()
        if STEP_DIR.match(name) and os.path.isfile(os.path.join(run, name, RUN_LORA)):
            return os.path.join(run, name)
    except OSError:
        pass
    sets = _complete_sets(run)
    return sets[max(sets)] if sets else None


def run_lora(run):
    """The LoRA file to sample a run with: a LoRA file as given; for a run folder the LoRA of its
    newest complete checkpoint (a step folder, or an old-layout folder, is read directly)."""
    if run.endswith(".safetensors") or not os.path.isdir(run):
        return run
    ckpt = latest_checkpoint(run)
    return os.path.join(ckpt or run, RUN_LORA)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    if os.path.lexists(tmp):                             # left by a killed process that had this pid
        os.remove(tmp)
    write(tmp)
    os.replace(tmp, path)


def _remove_tree(path):
    """Rename to a `.del<pid>` name first: a folder half deleted by a kill never looks complete."""
    trash = f"{path}.del{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _publish(src, dst):
    """dst becomes the same file as src (a hard link; a copy where links are not supported)."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return                                           # (rename onto a link of the same file is a no-op)
    def link(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    _replace_atomically(dst, link)


def _publish_set(run, ckpt):
    """The top-level LoRA pair becomes ckpt's (the convenience copies other tools and --init-lora read)."""
    for name in (RUN_LORA, companion_path(RUN_LORA)):
        src, dst = os.path.join(ckpt, name), os.path.join(run, name)
        if os.path.exists(src):
            _publish(src, dst)
        elif os.path.exists(dst):
            os.remove(dst)


def commit_checkpoint(run, step, write, keep=KEEP_CHECKPOINTS):
    """Write one checkpoint set with write(folder) and make it the run's latest, all or nothing
    (see the layout above). Returns the step folder."""
    tmp = f"{step_dir(run, step)}.tmp{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    write(tmp)
    for name in os.listdir(tmp):
        _fsync(os.path.join(tmp, name))                  # on disk before any name points at them
    final = step_dir(run, step)
    if os.path.exists(final):                            # this step saved before a crash, or by an older run
        _remove_tree(final)
    os.rename(tmp, final)                                # the commit: a folder of this name is complete
    _fsync(run)                                          # (the rename itself on disk, for power cuts)

    def point(path):
        with open(path, "w") as f:
            f.write(os.path.basename(final) + "\n")
            f.flush()
            os.fsync(f.fileno())
    _replace_atomically(os.path.join(run, RUN_LATEST), point)
    _fsync(run)
    _publish_set(run, final)
    # prune: sets of later steps are stale (an older run in this folder, or a set this run will write
    # again after a resume); of the earlier ones keep the newest keep - 1
    sets = _complete_sets(run)
    older = sorted(s for s in sets if s < step)
    for s in [s for s in sets if s > step] + older[:max(0, len(older) - (keep - 1))]:
        _remove_tree(sets[s])
    return final


def tidy_run(run):
    """After a kill: delete the temporary files and folders (`*.tmp<pid>*`, `*.del<pid>`) that writers
    left in run, those of processes that no longer run (and this one's), and republish the top-level
    LoRA pair from the latest checkpoint (a kill may have torn it). Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(run)) if os.path.isdir(run) else ():
        m = STALE_NAME.search(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue                                     # another process may still be writing it
        path = os.path.join(run, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        removed.append(name)
    ckpt = latest_checkpoint(run)
    if ckpt is not None:
        _publish_set(run, ckpt)
    return removed


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- command-line checks (train.py, sample.py)

def use_tf32(device):
    """On CUDA, TF32 for what stays fp32 (the frozen VAE, the loss): fp32's range, several times faster."""
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def device_problem(name):
    """None if torch can use device `name` here, else one line saying which devices exist."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device {name!r} is not a device name: use cpu, cuda or cuda:N"
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            return f"--device {name}: this machine has no CUDA device; use --device cpu"
        if dev.index is not None and dev.index >= n:
            return f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: MPS is not available here; use --device cpu"
    elif dev.type not in ("cpu", "cuda", "mps"):
        return f"--device {name}: use cpu, cuda or cuda:N"
    return None


def native_res(meta, sd_default):
    """HxW a base checkpoint was trained at: tiny.py records it ("diff2flow.res"; the first bundled
    prior, which did not, was 96x128); an SD file records nothing, so the caller's default holds."""
    if meta.get("diff2flow.family") == "tiny" or "diff2flow.res" in meta:
        return parse_hw(meta.get("diff2flow.res", "96x128"))
    return sd_default


def parse_hw(res, flag="--res"):
    """'384x512' -> (384, 512); ValueError naming the flag otherwise."""
    try:
        h, w = (int(v) for v in str(res).lower().split("x"))
    except ValueError:
        raise ValueError(f"{flag} must look like HxW, e.g. 384x512, got {res!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{flag} {res}: height and width must be positive")
    return h, w
