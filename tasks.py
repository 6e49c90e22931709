"""
The tasks as the training loop sees them: what a batch is, and how a run is validated.

    DepthTask   image -> depth: x1 = the depth latent, the image latent concatenated to the UNet's input;
                Hypersim + Virtual KITTI 2 (or rendered scenes) through a latent cache on disk
    ImageTask   text-to-image (a caption folder, its latents cached the same way) and reflow (stored
                noise/latent/caption pairs)

Both serve training sample n of the run (data.EpochMix: every item once per epoch, the same on resume
and on every rank, each rank reading only its own samples), and both score held-out data the way
sample.py samples, on every rank at once (each its share) so no rank waits on another's evaluation.
"""
import hashlib
import json
import os

import numpy as np
import torch

import data
import depth_eval
import data_t2i
import sample
import shards
from checkpoint import parse_hw
from diff2flow import multires_noise

VAL_SCENES = 64          # held-out items scored at each validation (rendered: disjoint seeds from training)
REPORT_ENSEMBLE = 4   # depth's final table: what `python sample.py --steps N` predicts (N: train.py --report-steps)


# ---------------------------------------------------------------------------------------------------
# Depth data: rendered scenes or the real sets, encoded to latents once

def parse_res(res, native, square=False):
    """--res, or the task's default: the size the base checkpoint records (a tiny prior's, see
    checkpoint.native_res), else SD's 384x512 (depth) or 512x512 (t2i)."""
    if res is not None:
        return parse_hw(res)
    return native or ((512, 512) if square else (384, 512))


def depth_sets(args, hw):
    """(training sets, their mixing probabilities, held-out set). Real data when given: Hypersim and
    Virtual KITTI 2 mixed 9:1, validated on real held-out data; else rendered scenes, held out by seed."""
    if not (args.hypersim or args.vkitti):
        return ([data.RenderedDepthDataset.split("train", args.train_scenes, *hw)], [1.0],
                data.RenderedDepthDataset.split("heldout", max(args.val_items, args.report_scenes), *hw))
    sets, probs = [], []
    if args.hypersim:
        split = args.hypersim_split or os.path.join(args.hypersim, "filename_list_train.txt")
        sets.append(data.DepthFileDataset("hypersim", args.hypersim, split, size=hw))
        probs.append(0.9)
    if args.vkitti:
        split = args.vkitti_split or os.path.join(args.vkitti, "vkitti_train.txt")
        sets.append(data.DepthFileDataset("vkitti", args.vkitti, split, size=hw))
        probs.append(0.1)
    return sets, probs, real_heldout(args, hw)


def real_heldout(args, hw):
    """--val-data KIND:ROOT[:SPLIT], else Hypersim's validation split (as Marigold validates)."""
    if args.val_data:
        kind, root, *split = args.val_data.split(":", 2)
        if kind not in data.DEPTH_KINDS or kind == "rendered":
            raise ValueError(f"--val-data {args.val_data!r}: KIND must be one of {', '.join(data.LAYOUTS)}")
        return data.DepthFileDataset(kind, root, split[0] if split else os.path.join(root, "filename_list_test.txt"), size=hw)
    places = [args.hypersim, os.path.join(os.path.dirname(os.path.abspath(args.hypersim)), "val")] if args.hypersim else []
    for root in places:
        split = os.path.join(root, "filename_list_val.txt")
        if os.path.exists(split):
            return data.DepthFileDataset("hypersim", root, split, size=hw)
    raise FileNotFoundError("no held-out depth data: Hypersim's validation split was not found at "
                            + (" or ".join(os.path.join(r, "filename_list_val.txt") for r in places) or "(no --hypersim)")
                            + "; pass --val-data KIND:ROOT[:SPLIT] (e.g. hypersim:data/hypersim/val:"
                            "data/hypersim/val/filename_list_val.txt)")


def spread_subset(dataset, n):
    """n items spread evenly over a data set (split files are sorted by scene: the first n would be one scene)."""
    idx = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    return torch.utils.data.Subset(dataset, idx.tolist())


@torch.no_grad()
def encode_depth_items(vae, items, norm, device):
    """A list of data items → latents: image (B, c, h, w), normalised depth (B, c, h, w), loss mask (B, 1, h, w)."""
    rgb = torch.stack([it["rgb"] for it in items]).to(device, non_blocking=True)
    depth = torch.stack([it["depth"] for it in items]).to(device, non_blocking=True)
    valid = torch.stack([it["valid"] for it in items]).to(device, non_blocking=True)
    x, _, _ = data.normalize_depth(depth, valid, norm)
    img = vae.encode(rgb)
    dep = vae.encode(x.repeat(1, 3, 1, 1))             # depth as a 3-channel image, as Marigold
    factor = rgb.shape[-1] // img.shape[-1]
    return img, dep, data.latent_valid_mask(valid, factor)


# ---------------------------------------------------------------------------------------------------
# The latent cache: nothing is augmented, so each training item is VAE-encoded once, to fp16 shards on
# disk, and read memory-mapped per step (shards.py). Per-step decoding and fp32 VAE work cost more than
# the LoRA step itself and would leave a GPU waiting.

CACHE_SHARD = 256        # items per cache shard (~3 MB at 384x512)


def dataset_identity(ds):
    """What a cache of this data set depends on, besides the checkpoint and normalisation."""
    if isinstance(ds, data.RenderedDepthDataset):
        with open(os.path.join(os.path.dirname(os.path.abspath(data.__file__)), "scenes.py"), "rb") as f:
            renderer = hashlib.sha256(f.read()).hexdigest()      # a changed renderer makes other scenes
        return dict(kind="rendered", seed0=ds.seed0, n=ds.n, hw=(ds.height, ds.width), renderer=renderer)
    rows = hashlib.sha256("\n".join(" ".join(r) for r in ds.rows).encode()).hexdigest()
    return dict(kind=ds.kind, root=os.path.realpath(ds.root), rows=rows, hw=ds.size, kb_crop=ds.kb_crop)


def latent_cache(vae, ds, name, args, info, device, rank, world, log):
    """The cache of one training set: rows `img`, `depth` (fp16 latents) and `mask` (bool), item order."""
    st = os.stat(info["ckpt"])
    ident = dict(dataset_identity(ds), ckpt=os.path.realpath(info["ckpt"]), ckpt_size=st.st_size,
                 ckpt_mtime_ns=st.st_mtime_ns, norm=args.norm, encoding="posterior mean, fp16", version=1)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(args.cache_dir, f"{name}_{ds_size(ds)}_{args.norm}_{key}")

    def make(idx):
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=16, collate_fn=list,
                                             num_workers=args.workers, pin_memory=device.startswith("cuda"))
        out = [encode_depth_items(vae, items, args.norm, device) for items in loader]
        img, dep, mask = (torch.cat(t).cpu() for t in zip(*out))
        return dict(img=img.half(), depth=dep.half(), mask=mask), {}

    made = shards.build(folder, "latents", len(ds), CACHE_SHARD, make, key=key, metadata=dict(ident=json.dumps(ident)),
                        rank=rank, world=world, desc=f"encoding {name} once", wait=True)
    cache = shards.ShardedRows(folder, "latents", key)
    log(f"latent cache {folder}: {len(cache)} items" + (f" ({made} shards encoded now)" if made else " (reused)"))
    return cache


def ds_size(ds):
    h, w = (ds.height, ds.width) if isinstance(ds, data.RenderedDepthDataset) else ds.size
    return f"{h}x{w}"


# ---------------------------------------------------------------------------------------------------
# Tasks: what a batch is, and how a run is validated

def sample_numbers(step, micro, args, rank, world):
    """Training samples of one micro-batch: optimizer step s takes samples [s·E, (s+1)·E) of the data
    stream (E = batch x accumulation x processes), so the data of a step does not depend on how E is split."""
    first = ((step * args.grad_accum + micro) * world + rank) * args.batch_size
    return list(range(first, first + args.batch_size))


class DepthTask:
    """Image → depth: x1 = the depth latent, the image latent concatenated to the UNet's input."""

    def __init__(self, args, vae, context, d2f, info, device, rank, world, log):
        self.args, self.vae, self.context, self.d2f, self.device = args, vae, context, d2f, device
        self.rank, self.world = rank, world
        hw = info["res"] = parse_res(args.res, info["native_res"])
        self.sets, probs, heldout = depth_sets(args, hw)
        self.samples = data.MixedDataset(self.sets, probs, args.seed)     # sample n of the run -> an item
        self.mix = self.samples.mix
        self.names = [s.kind if isinstance(s, data.DepthFileDataset) else "rendered" for s in self.sets]
        self.heldout = spread_subset(heldout, args.val_items)
        self.report_set = spread_subset(heldout, args.report_scenes) if args.report_scenes > 0 else None
        for what, subset in (("--val-items", self.heldout), ("--report-scenes", self.report_set)):
            if subset is not None and len(subset) < world:
                raise ValueError(f"{what}: {len(subset)} held-out items for {world} processes; each needs one")
        self.caches, self.stream, self._mean_map = None, None, None
        if not args.no_cache:
            self.caches = [latent_cache(vae, s, n, args, info, device, rank, world, log) for s, n in zip(self.sets, self.names)]
        log(f"training on {' + '.join(f'{len(s)} {n}' for s, n in zip(self.sets, self.names))} items at {hw[0]}x{hw[1]}"
            + (f", mixed {':'.join(f'{p:g}' for p in probs)} per sample" if len(self.sets) > 1 else "")
            + f", each set seen in full epoch by epoch; held-out: {len(self.heldout)} items of {describe_set(heldout)}")

    def start(self, step, end):
        """Without the cache: a DataLoader (workers, pinned memory) reads this rank's samples from `step` on."""
        if self.caches is None:
            a, r, w = self.args, self.rank, self.world
            numbers = [n for s in range(step, end) for m in range(a.grad_accum) for n in sample_numbers(s, m, a, r, w)]
            self.stream = iter(torch.utils.data.DataLoader(self.samples, sampler=numbers, batch_size=a.batch_size, collate_fn=list,
                                                           num_workers=a.workers, pin_memory=self.device.startswith("cuda")))

    def batch(self, samples, g):
        if self.caches is None:
            img, dep, mask = encode_depth_items(self.vae, next(self.stream), self.args.norm, self.device)
        else:
            rows = [[] for _ in self.caches]
            for n in samples:
                k, i = self.mix(n)
                rows[k].append(i)
            got = [self.caches[k].rows(idx) for k, idx in enumerate(rows) if idx]
            pin = self.device.startswith("cuda")
            img, dep, mask = (torch.cat([r[name] for r in got]) for name in ("img", "depth", "mask"))
            img, dep, mask = ((t.pin_memory() if pin else t).to(self.device, non_blocking=True) for t in (img, dep, mask))
            img, dep = img.float(), dep.float()
        noise = None
        if self.args.multires_noise > 0:   # drawn from g too: a resumed run repeats it
            noise = multires_noise(dep.shape, self.args.multires_noise, g).to(dep.device, dep.dtype)
        return dict(x1=dep, concat=img, mask=mask, noise=noise, context=self.context.expand(len(img), -1, -1))

    def _scores(self, evaluate, dataset):
        """Each rank scores its share of the held-out items; the means over all of them, on every rank."""
        part = torch.utils.data.Subset(dataset, range(self.rank, len(dataset), self.world))
        scores = all_ranks_mean(evaluate(part), len(part), self.world, self.device)
        return dict(scores, items=len(dataset), items_this_rank=len(part))

    def baseline(self):
        return dict(kind="trivial", **self.trivial(self.heldout))

    def trivial(self, heldout, n=500):
        """The baseline every depth number must beat: the mean normalised training depth map (of the first
        n training samples, each rank averaging its share), scored like a prediction."""
        if self._mean_map is None:     # read once: the validation and the report baselines share it
            share = torch.utils.data.Subset(self.samples, range(self.rank, n, self.world))
            total = data.mean_normalized_depth(share, mode=self.args.norm).double() * len(share)
            self._mean_map = (all_ranks_sum(total.to(self.device), self.world).cpu() / n).float()
        mean_map = self._mean_map
        return self._scores(lambda part: depth_eval.evaluate(lambda rgb: mean_map.expand(rgb.shape[0], -1, -1, -1), part,
                                                             space=depth_eval.alignment_space(self.args.norm),
                                                             desc="trivial"), heldout)

    def report(self, unet, step):
        """The final table: sample.py's protocol (aligned ensemble) on more held-out items than validation
        uses, since 64 and one member cannot resolve a few percent. At step 0 with the trivial baseline."""
        if self.report_set is None:
            return []
        recs = []
        if step == 0:
            recs.append(dict(kind="report_trivial", **self.trivial(self.report_set)))
        recs.append(dict(kind="report", steps=self.args.report_steps, ensemble=REPORT_ENSEMBLE, **self._scores(
            lambda part: sample.evaluate_heldout(unet, self.vae, self.d2f, self.context, part, self.args.objective,
                                                 self.args.report_steps, norm=self.args.norm, ensemble=REPORT_ENSEMBLE,
                                                 multires=self.args.multires_noise), self.report_set)))
        return recs

    def validate(self, unet, step):
        preview = os.path.join(self.args.out, f"preview_{step:06d}.png") if self.rank == 0 else None
        return self._scores(lambda part: sample.evaluate_heldout(
            unet, self.vae, self.d2f, self.context, part, self.args.objective, self.args.val_steps, norm=self.args.norm,
            multires=self.args.multires_noise, preview=preview), self.heldout)

    @staticmethod
    def describe(r):
        return f"held-out AbsRel {r['abs_rel']:.4f} δ1 {r['delta1']:.4f}"

    def summary(self, records, log):
        space = "log" if self.args.norm == "log" else "depth"
        vals = [r for r in records if r["kind"] == "val"]
        trivial = [r for r in records if r["kind"] == "trivial"][-1]
        reports = [r for r in records if r["kind"] == "report"]
        table = (vals[0], trivial, vals[-1])
        how = f"{len(self.heldout)} items, {self.args.val_steps} steps, 1 member"
        if len(reports) >= 2 and reports[0]["step"] == 0:
            log(f"\nvalidation ({how}): untouched prior {vals[0]['abs_rel']:.4f}, mean depth map "
                f"{trivial['abs_rel']:.4f}, finetuned {vals[-1]['abs_rel']:.4f} AbsRel")
            table = (reports[0], [r for r in records if r["kind"] == "report_trivial"][-1], reports[-1])
            how = (f"{len(self.report_set)} items, {self.args.report_steps} steps, ensemble {REPORT_ENSEMBLE}, "
                   f"as python sample.py --steps {self.args.report_steps}")
        log(f"\nheld-out depth ({how}; alignment in {space} space):")
        log(f"  {'':34s} AbsRel ↓  δ1 ↑")
        for name, r in zip(("untouched prior", "trivial baseline (mean depth map)",
                            f"finetuned ({self.args.objective}, step {table[2]['step']})"), table):
            log(f"  {name:34s} {r['abs_rel']:.4f}   {r['delta1']:.4f}")


def describe_set(ds):
    return f"{ds.kind} {ds.root}" if isinstance(ds, data.DepthFileDataset) else "rendered scenes (disjoint seeds)"


def all_ranks_sum(x, world):
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(x)
    return x


def all_ranks_mean(scores, n, world, device):
    """Per-rank means over n items each → the means over all items (every rank gets them)."""
    if world == 1:
        return scores
    keys = sorted(scores)
    t = all_ranks_sum(torch.tensor([scores[k] * n for k in keys] + [n], dtype=torch.float64, device=device), world)
    return {k: float(t[i] / t[-1]) for i, k in enumerate(keys)}


class ImageTask:
    """Text-to-image (a caption folder, its latents encoded once into an on-disk cache) and reflow (stored
    noise/latent/caption pairs). Both read fp16 shards memory-mapped, so memory does not grow with the
    set; training sample n of the run is item EpochMix(n) (every item once per epoch, the same on resume
    and on every rank), and each rank reads only the rows of its own samples."""

    def __init__(self, args, vae, text_encoder, context, d2f, info, device, rank, world, log):
        self.args, self.vae, self.text, self.context, self.d2f, self.device = args, vae, text_encoder, context, d2f, device
        self.rank = rank
        if args.task == "t2i":
            hw = info["res"] = parse_res(args.res, info["native_res"], square=True)
            dataset = data_t2i.CaptionFolder(args.data, hw, args.manifest, 0.0, args.seed)
            st = os.stat(info["ckpt"])
            key = data_t2i.digest(os.path.realpath(info["ckpt"]), st.st_size, st.st_mtime_ns, hw, dataset.items)
            folder = os.path.join(args.cache_dir, f"t2i_{hw[0]}x{hw[1]}_{key}")
            made = data_t2i.cache_latents(dataset, lambda rgb: vae.encode(rgb.to(device)), folder, key, rank=rank, world=world,
                                          metadata={"data": os.path.abspath(args.data), "res": f"{hw[0]}x{hw[1]}",
                                                    "ckpt": os.path.basename(info["ckpt"])})
            self.rows, self.names = data_t2i.LatentCache(folder, key), ("latent",)
            where = f"latents cached in {folder}" + (f" ({made} shard(s) encoded now)" if made else "")
        else:
            self.rows, self.names = data_t2i.ReflowPairs(args.pairs), ("latent", "noise")
            where = f"pairs from {args.pairs} ({self.rows.metadata.get('steps', '?')} steps, CFG {self.rows.metadata.get('cfg', '?')})"
        shape = tuple(self.rows.rows([0], ["latent"])["latent"].shape[1:])
        if args.task == "reflow":
            info["res"] = tuple(s * 2 ** (len(vae.cfg.ch_mult) - 1) for s in shape[-2:])
        self.mix = data.EpochMix([len(self.rows)], seed=args.seed)
        some = self.rows.strings("caption", range(min(len(self.rows), 256)))
        if text_encoder is None and any(some):
            log("note: this checkpoint has no text encoder (the tiny prior): captions are ignored, training is unconditional")
        log(f"{args.task}: {len(self.rows)} {'images' if args.task == 't2i' else 'pairs'}, latents {shape}, {where}; "
            f"caption dropout {args.caption_dropout}")
        g = torch.Generator().manual_seed(10 ** 6)   # held-out noise, never used in training
        self.val_noise = torch.randn((args.val_samples, *shape), generator=g).to(device)
        prompts = data_t2i.read_prompts(args.val_prompts) if args.val_prompts else (some[:8] or [""])
        self.val_context = self.encode_text([prompts[i % len(prompts)] for i in range(args.val_samples)])

    def encode_text(self, captions):
        if self.text is None:
            return self.context.expand(len(captions), -1, -1)
        with torch.no_grad():
            return self.text.encode(captions).to(self.device)

    def batch(self, samples, g):
        """Training samples `samples` (global sample numbers of the run) → the batch; g draws caption dropout."""
        idx = [self.mix(n)[1] for n in samples]
        rows = {k: v.to(self.device, torch.float32) for k, v in self.rows.rows(idx, self.names).items()}
        drop = torch.rand(len(idx), generator=g) < self.args.caption_dropout   # for classifier-free guidance
        captions = ["" if d else c for c, d in zip(self.rows.strings("caption", idx), drop.tolist())]
        return dict(x1=rows["latent"], concat=None, mask=None, noise=rows.get("noise"), context=self.encode_text(captions))

    def start(self, step, end):
        """Nothing to set up: batches are read from the shards on demand."""

    def baseline(self):
        return None

    def report(self, unet, step):
        return []

    def validate(self, unet, step):
        return sample.straightness(unet, self.vae, self.d2f, self.val_context, self.val_noise, self.args.objective,
                                   few=self.args.val_steps, many=self.args.val_many_steps,
                                   preview=os.path.join(self.args.out, f"preview_{step:06d}.png") if self.rank == 0 else None)

    def describe(self, r):
        return (f"{self.args.val_steps}-step vs {self.args.val_many_steps}-step distance {r['distance']:.4f}, spread "
                f"{r['spread']:.3f} ({self.args.val_many_steps}-step: {r['spread_many']:.3f})")

    def summary(self, records, log):
        vals = [r for r in records if r["kind"] == "val"]
        log(f"\nheld-out noise, {self.args.val_steps} Euler steps against {self.args.val_many_steps} from the same noise:")
        for name, r in (("before", vals[0]), (f"after {vals[-1]['step']} steps", vals[-1])):
            log(f"  {name:20s} {self.describe(r)}")
