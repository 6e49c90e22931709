"""Tests of text-to-image and reflow: caption data, pair shards, Fréchet distance, t2i sampling, reflow."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data_t2i
import sample
import train
from checkpoint import TINY_PRIOR
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


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
    a, b = torch.rand(6, dtype=torch.float64, generator=g) + 0.1, torch.rand(6, dtype=torch.float64, generator=g) + 0.1
    mu1, mu2 = torch.randn(6, dtype=torch.float64, generator=g), torch.randn(6, dtype=torch.float64, generator=g)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T      # commuting: the root is elementwise
    closed = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert abs(sample.frechet_distance(mu1, s1, mu2, s2) - closed) < 1e-10
    assert abs(sample.frechet_distance(mu1, s1, mu1, s1)) < 1e-10
    # from Gaussian features: sample statistics of 200k draws give the same number
    z1 = torch.randn(200_000, 6, dtype=torch.float64, generator=g) * a.sqrt() @ q.T + mu1
    z2 = torch.randn(200_000, 6, dtype=torch.float64, generator=g) * b.sqrt() @ q.T + mu2
    est = sample.frechet_distance(*sample.feature_statistics(z1), *sample.feature_statistics(z2))
    assert abs(est - closed) < 0.02 * closed


def test_fid_with_a_torchscript_extractor(tmp_path):
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)))
    net.save(str(tmp_path / "feat.pt"))
    features = sample.load_feature_extractor(str(tmp_path / "feat.pt"))
    x = torch.randint(0, 256, (40, 3, 8, 8)).float()
    assert abs(sample.fid(features, x, x)) < 1e-6 and sample.fid(features, x, x.flip(0) * 0.5) > 0.1
    with pytest.raises(FileNotFoundError, match="feature extractor not found"):
        sample.load_feature_extractor(str(tmp_path / "inception.pt"))


def test_pairs_resume_and_torn_shards(tiny_ckpt, tmp_path):
    folder = str(tmp_path / "pairs")
    cmd = ["--task", "t2i", "--ckpt", tiny_ckpt, "--save-pairs", folder, "--num", "10", "--shard-size", "4",
           "--steps", "2", "--res", "16x16", "--prompt", "a test prompt"]
    sample.main(cmd)
    shards = sorted(os.listdir(folder))
    assert shards == [data_t2i.SHARD.format(k) for k in range(3)]
    first = data_t2i.ReflowPairs(folder)
    assert len(first) == 10 and first.captions == ["a test prompt"] * 10
    assert data_t2i.ReflowPairs.settings(folder)["steps"] == "2"
    # a kill mid-run: one shard missing, one cut short (a copy interrupted), a stray temporary file
    os.remove(os.path.join(folder, shards[1]))
    with open(os.path.join(folder, shards[2]), "r+b") as f:
        f.truncate(200)
    open(os.path.join(folder, shards[0] + ".tmp123"), "wb").close()
    with pytest.raises(ValueError, match="cut short"):
        data_t2i.ReflowPairs(folder)
    assert data_t2i.missing_shards(folder, 10, 4) == [1, 2]
    sample.main(cmd)
    again = data_t2i.ReflowPairs(folder)
    assert torch.equal(again.noise, first.noise) and torch.equal(again.latent, first.latent)
    with pytest.raises(ValueError, match="no prompts"):
        sample.save_pairs(sample.load_run(None, tiny_ckpt), folder, [], 4, latent_hw=(4, 4))


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
    meta = sample.read_metadata(os.path.join(run, train.LORA_FILE))
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
