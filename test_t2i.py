"""Tests of text-to-image and reflow: caption data, pair shards, t2i sampling, reflow."""
import glob
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data_t2i
import rehearse_t2i
import sample
import shards
import tasks
import train
from checkpoint import TINY_PRIOR, load_sd_checkpoint, run_lora
from lora import companion_path, inject_lora, kohya_name, lora_layers, lora_metadata, save_lora
from test_depth import tiny_ckpt  # noqa: F401  (the fixture: a tiny random SD-layout checkpoint)


def write_image(path, h, w, seed=0):
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture
def caption_folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i, (h, w) in enumerate([(40, 60), (70, 50), (32, 32)]):
        write_image(root / f"img{i}.png", h, w, i)
        (root / f"img{i}.txt").write_text(f"caption number {i}\n")
    return root


def test_caption_folder_crops_and_captions(caption_folder):
    ds = data_t2i.CaptionFolder(str(caption_folder), size=(24, 32), caption_dropout=0)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["rgb"].shape == (3, 24, 32) and item["rgb"].min() >= -1 and item["rgb"].max() <= 1
        assert item["caption"] == f"caption number {i}"
    # a centre crop: a 40x60 image scaled by 0.8 to 32x48 (shorter side first) then cropped in the middle
    full = data_t2i.load_rgb(str(caption_folder / "img0.png"), (32, 48))
    assert torch.allclose(data_t2i.load_rgb(str(caption_folder / "img0.png"), (32, 32)), full[:, :, 8:40])


def test_manifest_and_its_errors(caption_folder, tmp_path):
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(json.dumps({"file": "img1.png", "text": "a manifest caption"}) + "\n\n")
    ds = data_t2i.CaptionFolder(str(caption_folder), (16, 16), manifest=str(manifest), caption_dropout=0)
    assert len(ds) == 1 and ds[0]["caption"] == "a manifest caption"
    manifest.write_text('{"file": "img1.png"}\n')
    with pytest.raises(ValueError, match="line 1"):
        data_t2i.CaptionFolder(str(caption_folder), (16, 16), manifest=str(manifest))
    manifest.write_text(json.dumps({"file": "nope.png", "text": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        data_t2i.CaptionFolder(str(caption_folder), (16, 16), manifest=str(manifest))


def test_caption_dropout_rate():
    """10% by default: over 4000 draws the share of empty captions lies within 4 standard errors."""
    ds = data_t2i.CaptionFolder.__new__(data_t2i.CaptionFolder)
    ds.rng, ds.caption_dropout, ds.items = np.random.default_rng(0), 0.1, [("x.png", "a caption")]
    ds.image = lambda i: None
    empty = np.mean([ds[0]["caption"] == "" for _ in range(4000)])
    assert abs(empty - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 4000)


def test_bad_caption_input(caption_folder, tmp_path):
    os.remove(caption_folder / "img2.txt")
    with pytest.raises(ValueError, match="img2.png has no caption file"):
        data_t2i.CaptionFolder(str(caption_folder), (16, 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data_t2i.CaptionFolder(str(tmp_path / "empty"), (16, 16))
    with pytest.raises(FileNotFoundError, match="missing image folder"):
        data_t2i.CaptionFolder(str(tmp_path / "nowhere"), (16, 16))
    (tmp_path / "prompts.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        data_t2i.read_prompts(str(tmp_path / "prompts.txt"))
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "t2i"])          # no --data


PAIR_CMD = ["--task", "t2i", "--num", "10", "--shard-size", "4", "--steps", "2", "--res", "16x16", "--prompt", "a test prompt"]


def read_pairs(folder):
    rows = data_t2i.ReflowPairs(folder)
    got = rows.rows(range(len(rows)))
    return got["noise"], got["latent"], rows.strings("caption", range(len(rows)))


def test_pairs_resume_and_torn_shards(tiny_ckpt, tmp_path):
    folder = str(tmp_path / "pairs")
    cmd = ["--ckpt", tiny_ckpt, "--save-pairs", folder, *PAIR_CMD]
    sample.main(cmd)
    names = sorted(os.listdir(folder))
    assert names == [os.path.basename(shards.shard_path(folder, data_t2i.PAIRS, k)) for k in range(3)]
    noise, latent, captions = read_pairs(folder)
    assert noise.shape == latent.shape == (10, 4, 8, 8) and noise.dtype == torch.float16
    assert captions == ["a test prompt"] * 10
    assert data_t2i.pair_settings(folder)["steps"] == "2"
    # a kill mid-run: one shard missing, one cut short (a copy interrupted), a stray temporary file
    os.remove(os.path.join(folder, names[1]))
    with open(os.path.join(folder, names[2]), "r+b") as f:
        f.truncate(200)
    open(os.path.join(folder, names[0] + ".tmp123"), "wb").close()
    with pytest.raises(ValueError, match="missing"):
        data_t2i.ReflowPairs(folder)
    sample.main(cmd)
    again = read_pairs(folder)
    assert torch.equal(again[0], noise) and torch.equal(again[1], latent) and not glob.glob(folder + "/*.tmp*")
    with pytest.raises(ValueError, match="no prompts"):
        sample.save_pairs(sample.load_run(None, tiny_ckpt), folder, [], 4, latent_hw=(4, 4))
    # other settings into the same folder: refused by name, the pairs are kept
    with pytest.raises(ValueError, match="cfg 7.5 -> 2.0"):
        sample.main(cmd + ["--cfg", "2"])
    assert torch.equal(read_pairs(folder)[1], latent)


def test_pairs_default_to_the_papers_40_steps_at_cfg_7_5(tiny_ckpt, tmp_path):
    folder = str(tmp_path / "pairs")
    sample.main(["--task", "t2i", "--ckpt", tiny_ckpt, "--save-pairs", folder, "--num", "2", "--res", "8x8"])
    settings = data_t2i.pair_settings(folder)
    assert settings["steps"] == "40" and settings["cfg"] == "7.5"


def test_pairs_split_between_torchrun_ranks(tiny_ckpt, tmp_path, monkeypatch):
    """Under torchrun each rank makes the shards k % world == rank; together they equal one process's."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    sample.main(["--ckpt", tiny_ckpt, "--save-pairs", one, *PAIR_CMD])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    sample.main(["--ckpt", tiny_ckpt, "--save-pairs", two, *PAIR_CMD])
    assert sorted(os.listdir(two)) == [os.path.basename(shards.shard_path(two, data_t2i.PAIRS, 1))]
    monkeypatch.setenv("RANK", "0")
    sample.main(["--ckpt", tiny_ckpt, "--save-pairs", two, *PAIR_CMD])
    for a, b in zip(read_pairs(one), read_pairs(two)):
        assert a == b if isinstance(a, list) else torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_sampling_is_bf16_on_cuda_only(tiny_ckpt):
    auto = sample.sampling_autocast(torch.device("cuda"))
    assert isinstance(auto, torch.autocast) and auto.fast_dtype == torch.bfloat16
    assert not isinstance(sample.sampling_autocast("cpu"), torch.autocast)
    loaded = sample.load_run(None, tiny_ckpt)
    noise = torch.randn(3, 4, 4, 4)
    x = sample.generate(loaded.unet, loaded.d2f, loaded.context.expand(3, -1, -1), noise, 2, batch=2)
    assert x.dtype == torch.float32 and x.shape == noise.shape
    one = sample.generate(loaded.unet, loaded.d2f, loaded.context.expand(3, -1, -1), noise, 2)
    assert torch.allclose(x, one, atol=1e-5)           # micro-batches change nothing


def test_t2i_images_carry_their_settings(tiny_ckpt, tmp_path):
    out = str(tmp_path / "t2i")
    sample.main(["--task", "t2i", "--ckpt", tiny_ckpt, "--prompt", "a red cube", "--num", "3", "--steps", "2",
                 "--cfg", "3", "--seed", "5", "--res", "16x24", "--out", out])
    with Image.open(os.path.join(out, "0005_001.png")) as im:
        assert im.size == (24, 16)
        assert im.info["prompt"] == "a red cube" and im.info["steps"] == "2" and im.info["cfg"] == "3.0"
        assert "Steps: 2" in im.info["parameters"] and im.info["seed"] == str(5 * 1_000_003 + 1)
    with Image.open(os.path.join(out, "grid_0005.png")) as grid:
        assert grid.size == (3 * 24, 16)


def test_t2i_and_reflow_training_runs_record_their_task(tiny_ckpt, caption_folder, tmp_path):
    run = str(tmp_path / "t2i_run")
    train.main(["--task", "t2i", "--ckpt", tiny_ckpt, "--data", str(caption_folder), "--res", "16x16", "--steps", "2",
                "--batch-size", "2", "--lora-rank", "4", "--out", run])
    meta = sample.read_metadata(run_lora(run))
    assert meta["diff2flow.task"] == "t2i" and meta["diff2flow.unet_in_channels"] == "4"
    vals = [json.loads(line) for line in open(os.path.join(run, train.LOG_FILE)) if '"val"' in line]
    assert vals[0]["step"] == 0 and vals[-1]["step"] == 2 and all(v["spread_many"] > 0 for v in vals)
    # sample.py finds and runs it as a t2i model; the depth sampler refuses it by name
    sample.main(["--task", "t2i", "--run", run, "--ckpt", tiny_ckpt, "--num", "2", "--steps", "1", "--out", str(tmp_path / "s")])
    with pytest.raises(ValueError, match="t2i run"):
        sample.main(["--run", run, "--ckpt", tiny_ckpt])


def test_reflow_straightens_the_tiny_prior(tmp_path):
    """On the bundled tiny prior: after 1-reflow on its own pairs, 2 Euler steps land closer to the
    25-step result from the same (held-out) noise, and the samples do not collapse."""
    pairs, run = str(tmp_path / "pairs"), str(tmp_path / "reflow")
    sample.main(["--task", "t2i", "--ckpt", TINY_PRIOR, "--save-pairs", pairs, "--num", "96", "--shard-size", "32",
                 "--steps", "20", "--cfg", "1"])
    train.main(["--task", "reflow", "--ckpt", TINY_PRIOR, "--pairs", pairs, "--steps", "120", "--batch-size", "16",
                "--lora-rank", "0", "--lr", "1e-4", "--val-steps", "2", "--val-every", "120", "--out", run])
    vals = [json.loads(line) for line in open(os.path.join(run, train.LOG_FILE)) if '"val"' in line]
    before, after = vals[0], vals[-1]
    print(f"2-step vs 25-step distance {before['distance']:.4f} -> {after['distance']:.4f}, "
          f"spread {before['spread']:.3f} -> {after['spread']:.3f} (25-step {after['spread_many']:.3f})")
    assert after["distance"] < 0.7 * before["distance"]
    assert after["spread"] > 0.5 * after["spread_many"]


# ---------------------------------------------------------------------------------------------------
# Reflow from a finetuned LoRA (--init-lora): trained once, reloaded as exactly that model

def add_lora_file(unet, path, times=1):
    """W += times * (alpha/r) up @ down for every layer of a kohya file: a reference written from the format
    alone, independent of lora.py's layers."""
    from safetensors.torch import load_file
    tensors, modules = load_file(path), {kohya_name(n): m for n, m in unet.named_modules()}
    with torch.no_grad():
        for k in [k for k in tensors if k.endswith(".lora_down.weight")]:
            stem = k[: -len(".lora_down.weight")]
            down, up = tensors[k].double(), tensors[stem + ".lora_up.weight"].double()
            w = modules[stem].weight
            delta = float(tensors[stem + ".alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1))
            w.copy_((w.double() + times * delta.view(w.shape)).to(w.dtype))
    return unet


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([100.0, 700.0]), ctx)


@pytest.fixture
def init_lora(tiny_ckpt, tmp_path):
    """A t2i LoRA of rank 4 with a non-zero update on every layer (as after a finetune)."""
    unet = load_sd_checkpoint(tiny_ckpt).unet
    inject_lora(unet, 4)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    path = str(tmp_path / "t2i" / "lora.safetensors")
    os.makedirs(os.path.dirname(path))
    save_lora(path, unet, {**lora_metadata("sd2", "v", task="t2i", objective="diff2flow"), "diff2flow.res_long_edge": "16"})
    return path


REFLOW_FAST = ["--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--val-samples", "2",
               "--val-steps", "1", "--val-many-steps", "2"]


@pytest.mark.parametrize("rank", ["4", "0"])
def test_reflow_from_init_lora_reloads_exactly(tiny_ckpt, init_lora, tmp_path, rank):
    pairs, run = str(tmp_path / "pairs"), str(tmp_path / "reflow")
    sample.main(["--task", "t2i", "--ckpt", tiny_ckpt, "--run", init_lora, "--save-pairs", pairs, "--num", "4",
                 "--shard-size", "2", "--steps", "2"])
    train.main(["--task", "reflow", "--ckpt", tiny_ckpt, "--pairs", pairs, "--init-lora", init_lora, "--lora-rank", rank,
                *REFLOW_FAST, "--out", run])
    meta = sample.read_metadata(run_lora(run))
    assert meta["diff2flow.init_lora"] == os.path.abspath(init_lora)
    assert meta["diff2flow.init_lora_sha256"] == data_t2i.file_sha256(init_lora)
    # the trained model, rebuilt from the files alone: base + init update + the reflow's update (or its full weights)
    reference = load_sd_checkpoint(tiny_ckpt).unet
    if rank == "0":
        from safetensors.torch import load_file
        reference.load_state_dict(load_file(companion_path(run_lora(run))))
    else:
        add_lora_file(add_lora_file(reference, init_lora), run_lora(run))
    want = unet_output(reference)
    loaded = sample.load_run(run, tiny_ckpt)
    assert not lora_layers(loaded.unet)
    err = (unet_output(loaded.unet) - want).abs().max() / want.abs().max()
    twice = unet_output(add_lora_file(reference, init_lora)) - want      # the init applied twice (the old bug)
    print(f"reloaded vs trained {err:.2e}; init applied twice {twice.abs().max() / want.abs().max():.2e}")
    assert err < 1e-5 < twice.abs().max() / want.abs().max() / 100
    sample.main(["--task", "t2i", "--run", run, "--ckpt", tiny_ckpt, "--num", "1", "--steps", "1", "--out", str(tmp_path / "s")])
    # the run carries a copy of its init LoRA: it loads after the original moves away, and not without both
    os.rename(init_lora, init_lora + ".moved")
    assert torch.equal(unet_output(sample.load_run(run, tiny_ckpt).unet), unet_output(loaded.unet))
    os.remove(os.path.join(run, sample.INIT_LORA))
    with pytest.raises(FileNotFoundError, match="init-lora"):
        sample.load_run(run, tiny_ckpt)


def test_sd_defaults_are_the_papers(tmp_path):
    """On SD: t2i batch 64 at a constant 1e-5 for 20k steps with 2% caption dropout; reflow batch 128 at a
    decaying 2e-5 for 60k steps. The accumulation follows the processes; the tiny prior keeps the demo's,
    and depth has its own."""
    def resolved(task, world=1, tiny=False, extra=()):
        args = train.parse_args(["--task", task, "--data", "x", "--pairs", "x", "--out", str(tmp_path), *extra])
        train.apply_defaults(args, dict(tiny=tiny), world, lambda *a: None)
        return args
    t2i = resolved("t2i")
    assert (t2i.caption_dropout, t2i.lr, t2i.decay, t2i.steps) == (0.02, 1e-5, "none", 20_000)
    assert t2i.batch_size * t2i.grad_accum == 64
    reflow = resolved("reflow", world=4)
    assert (reflow.lr, reflow.decay, reflow.steps) == (2e-5, "cosine", 60_000) and reflow.lora_rank == 64
    assert reflow.batch_size * reflow.grad_accum * 4 == 128
    assert resolved("reflow", extra=["--batch-size", "4"]).grad_accum == 32
    assert resolved("t2i", extra=["--caption-dropout", "0.3", "--lr", "1e-4"]).caption_dropout == 0.3
    tiny = resolved("t2i", tiny=True)
    assert (tiny.caption_dropout, tiny.lr, tiny.steps, tiny.batch_size, tiny.grad_accum, tiny.decay) == (0.1, 1e-3, 1500, 8, 1, "cosine")
    depth = resolved("depth")
    assert depth.batch_size * depth.grad_accum == 32 and depth.lr == 3e-5 and depth.decay == "cosine"


def test_t2i_latents_are_cached_on_disk_and_every_image_seen_each_epoch(tiny_ckpt, caption_folder, tmp_path):
    args = train.parse_args(["--task", "t2i", "--ckpt", tiny_ckpt, "--data", str(caption_folder), "--res", "16x16",
                             "--batch-size", "3", "--out", str(tmp_path / "run"), "--caption-dropout", "0"])
    unet, vae, text, ctx, d2f, info = train.build(args)
    train.apply_defaults(args, info, 1, print)
    task = tasks.ImageTask(args, vae, text, ctx, d2f, info, "cpu", 0, 1, print)
    folder = os.path.dirname(task.rows.paths[0])
    cache = data_t2i.LatentCache(folder, task.rows.metadata["key"])
    assert os.path.dirname(folder) == os.path.join(str(tmp_path), "latent_cache")
    assert len(cache) == 3 and cache.rows([0])["latent"].dtype == torch.float16
    for epoch in range(2):
        batch = task.batch(list(range(3 * epoch, 3 * epoch + 3)), torch.Generator().manual_seed(0))
        got = sorted(batch["x1"].flatten(1).sum(1).tolist())
        want = sorted(cache.rows(range(3))["latent"].float().flatten(1).sum(1).tolist())
        assert got == pytest.approx(want)


def test_pair_loading_and_latent_caching_memory_is_flat(tmp_path):
    """Peak resident memory with 6x the items stays within a few MB (the old loaders held every pair and
    image in fp32: +100 MB and +145 MB here). Shards of 8 rows: the mapped pages are at their bound in both."""
    small, large = (rehearse_t2i.run_probe(n, str(tmp_path / str(n)), shard_size=8) for n in (600, 3600))
    print(small, large)
    assert large["pairs_mb"] - small["pairs_mb"] < 25 and large["cache_mb"] - small["cache_mb"] < 25
