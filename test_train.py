"""The SD training path (issue: the paper's depth run): device-clean hot paths, the data stream, the
latent cache, defaults, DDP on gloo, and LoRA target sets. Tiny models with every parameter random."""
import os

import pytest
import torch

import data
import tasks
import train
from diff2flow import Diff2Flow, conditioned
from unet import UNetConfig, UNetModel, widen_input_conv
from vae import AutoencoderKL, VAEConfig


def tiny_models(device):
    with torch.device(device):
        unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_levels=(1,),
                                    context_dim=32, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True))
        vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    widen_input_conv(unet, 8)
    return unet, vae


@pytest.mark.parametrize("prediction,zero_snr,objective", [("v", True, "diff2flow"), ("eps", False, "diff2flow"),
                                                           ("v", False, "diffusion"), ("v", False, "fm")])
def test_training_step_creates_every_tensor_on_its_inputs_device(prediction, zero_snr, objective):
    """The whole depth step (normalise, encode, mask, loss, backward) on the meta device: any tensor a
    function makes on the CPU next to its inputs (the quantile tensor that crashed every CUDA run) or any
    host sync (.item(), a Python `if` on a tensor) raises here, as it would stall or crash a GPU."""
    unet, vae = tiny_models("meta")
    d2f = Diff2Flow(prediction, zero_snr)
    rgb = torch.empty(2, 3, 32, 32, device="meta")
    depth = torch.empty(2, 1, 32, 32, device="meta")
    valid = torch.empty(2, 1, 32, 32, dtype=torch.bool, device="meta")
    items = [dict(rgb=rgb[i], depth=depth[i], valid=valid[i]) for i in range(2)]
    img, dep, mask = tasks.encode_depth_items(vae, items, "log", "meta")
    assert img.device.type == dep.device.type == mask.device.type == "meta"
    model = conditioned(unet, torch.empty(2, 77, 32, device="meta"), concat=img)
    loss = d2f.loss(model, dep, objective, mask=mask).mean()
    loss.backward()
    assert loss.device.type == "meta" and unet.out[2].weight.grad.device.type == "meta"


# ----------------------------------------------------------------------------- DDP without NCCL's pitfalls

def test_rank_check_gathers_on_the_training_device(monkeypatch):
    """NCCL cannot all-gather CPU tensors: every multi-GPU run used to fail at its very end."""
    import torch.distributed as dist
    seen = []
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather", lambda out, x: seen.append(x.device.type) or [o.copy_(x) for o in out])
    unet, _ = tiny_models("cpu")
    unet.requires_grad_(True).to("meta")
    with pytest.raises(RuntimeError):        # copying a meta tensor out fails after the gather: enough
        train.check_ranks_agree(unet, "meta", lambda *a: None, lambda r: None)
    assert seen == ["meta"]


def test_a_step_takes_the_same_samples_however_the_batch_is_split():
    """Step s trains on samples [s·E, (s+1)·E) of the stream for any batch x accumulation x ranks = E."""
    class A:
        pass

    def step_samples(batch, accum, world, step):
        a = A()
        a.batch_size, a.grad_accum = batch, accum
        got = [n for r in range(world) for m in range(accum) for n in tasks.sample_numbers(step, m, a, r, world)]
        assert len(got) == len(set(got))                 # no sample twice in a step
        return sorted(got)
    for step in (0, 3):
        want = list(range(step * 32, (step + 1) * 32))
        assert step_samples(8, 4, 1, step) == step_samples(4, 2, 4, step) == step_samples(32, 1, 1, step) == want


# ----------------------------------------------------------------------------- defaults and LoRA targets

def test_sd_defaults_are_the_papers_and_printed():
    args = train.parse_args(["--task", "depth", "--out", "runs/x"])
    lines = []
    train.apply_defaults(args, dict(tiny=False), 1, lines.append)
    assert (args.steps, args.batch_size, args.grad_accum, args.lr, args.ema) == (20000, 8, 4, 3e-5, 0.999)
    assert args.train_scenes == 2000          # rendered scenes at 384x512 only smoke-test the SD path
    assert args.report_steps == 2             # the paper's "only two sampling steps"
    assert args.batch_size * args.grad_accum == train.SD_DEFAULTS["depth"]["batch"]
    assert "batch 32 per optimizer step = 8 per process x 4 accumulation x 1 process" in lines[0]
    args = train.parse_args(["--task", "depth", "--batch-size", "4", "--lora-rank", "0"])
    train.apply_defaults(args, dict(tiny=False), 2, lines.append)   # 2 ranks: the accumulation halves
    assert (args.grad_accum, args.lr) == (4, 3e-5) and "4 per process x 4 accumulation x 2 processes" in lines[-1]
    args = train.parse_args(["--task", "depth"])
    train.apply_defaults(args, dict(tiny=True), 1, lines.append)    # the CPU demo keeps its own
    assert (args.steps, args.batch_size, args.grad_accum, args.lr, args.ema, args.train_scenes, args.report_steps) == (
        2000, 16, 1, 1e-3, 0.0, 8000, 1)
    args = train.parse_args(["--task", "depth", "--train-scenes", "300"])
    train.apply_defaults(args, dict(tiny=True), 1, lines.append)    # given, kept
    assert args.train_scenes == 300


@pytest.mark.parametrize("rank,targets,want_m,paper", [(64, None, 61.5, "small"), (0.2, None, 217.3, "base"),
                                                        (0.2, "conv,attn", 207.4, None)])
def test_lora_targets_give_the_papers_counts_on_sd21(rank, targets, want_m, paper, capsys):
    """--lora-rank 0.2 used to train 445 M parameters (every group at 20%), twice the paper's 'LoRA base'."""
    from lora import PAPER_TRAINED, inject_lora, parse_targets
    from unet import SD2_UNET
    name, groups = parse_targets(targets, rank)
    with torch.device("meta"):
        unet = UNetModel(SD2_UNET)
    widen_input_conv(unet, 8)
    inject_lora(unet, rank, targets=groups)
    n = sum(p.numel() for k, p in unet.named_parameters() if "lora_" in k)
    assert abs(n / 1e6 - want_m) < 0.05
    if paper:
        assert name == paper and abs(n - PAPER_TRAINED[paper]) / PAPER_TRAINED[paper] < 0.03
    with pytest.raises(SystemExit):
        train.parse_args(["--lora-targets", "conv,mlp"])
    assert "--lora-targets 'conv,mlp'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real data, the latent cache

from test_depth import FAST, read_log, tiny_ckpt  # noqa: E402,F401  (the tiny checkpoint fixture)


@pytest.fixture(scope="module")
def hypersim(tmp_path_factory):
    """Hypersim as Marigold lays it out: train/ and val/ side by side, each with its split file."""
    from scenes import render_scene
    root = tmp_path_factory.mktemp("hypersim")
    for split, seeds in (("train", range(0, 12)), ("val", range(100, 106))):
        data.write_depth_set("hypersim", str(root / split), [render_scene(s, 24, 32) for s in seeds], split_name=split)
    return str(root / "train")


REAL = ["--res", "32x32", "--batch-size", "2", "--lora-rank", "4", "--val-every", "1000", "--report-scenes", "4",
        "--val-items", "4"]


def test_real_data_run_validates_on_real_data_and_caches_latents_once(tiny_ckpt, hypersim, tmp_path, capsys):
    run = str(tmp_path / "a")
    train.main(["--ckpt", tiny_ckpt, "--hypersim", hypersim, "--steps", "2", "--out", run, *REAL])
    out = capsys.readouterr().out
    assert "held-out: 4 items of hypersim" in out and os.path.join("val") in out      # not rendered scenes
    vals = [r for r in read_log(run) if r["kind"] == "val"]
    assert vals and vals[0]["items"] == 4
    caches = os.listdir(str(tmp_path / "latent_cache"))
    assert len(caches) == 1 and caches[0].startswith("hypersim_32x32_log_")
    assert "1 shards encoded now" in out
    # a second run on the same checkpoint, data, normalisation and resolution reuses it; another normalisation not
    train.main(["--ckpt", tiny_ckpt, "--hypersim", hypersim, "--steps", "1", "--out", str(tmp_path / "b"), *REAL])
    assert "(reused)" in capsys.readouterr().out
    train.main(["--ckpt", tiny_ckpt, "--hypersim", hypersim, "--steps", "1", "--out", str(tmp_path / "c"),
                "--norm", "affine", *REAL])
    assert len(os.listdir(str(tmp_path / "latent_cache"))) == 2


def test_cached_batches_are_the_batches_encoded_per_step(tiny_ckpt, hypersim, tmp_path):
    """The cache is exact up to its fp16 storage: the same samples, the same latents and masks."""
    def task(*extra):
        args = train.parse_args(["--ckpt", tiny_ckpt, "--hypersim", hypersim, "--out", str(tmp_path / "r"), *REAL, *extra])
        unet, vae, _, context, d2f, info = train.build(args, lambda *a: None)
        train.apply_defaults(args, info, 1, lambda *a: None)
        t = tasks.DepthTask(args, vae, context, d2f, info, "cpu", 0, 1, lambda *a: None)
        t.start(0, 5)
        return t
    cached, direct = task(), task("--no-cache")
    assert cached.caches is not None and direct.caches is None
    for step in range(5):       # 5 steps x 2 = 10 samples of 12 items, then the next epoch
        samples = tasks.sample_numbers(step, 0, cached.args, 0, 1)
        a, b = cached.batch(samples, torch.Generator()), direct.batch(samples, torch.Generator())
        for k in ("x1", "concat"):
            assert (a[k] - b[k]).abs().max() <= 2e-3 * b[k].abs().max()
        assert torch.equal(a["mask"], b["mask"])


def test_a_torn_or_missing_cache_shard_is_rebuilt_alone(tiny_ckpt, hypersim, tmp_path, capsys):
    args = ["--ckpt", tiny_ckpt, "--hypersim", hypersim, "--steps", "1", *REAL, "--val-every", "1000"]
    train.main([*args, "--out", str(tmp_path / "a")])
    folder = os.path.join(str(tmp_path / "latent_cache"), os.listdir(str(tmp_path / "latent_cache"))[0])
    shard = os.path.join(folder, "latents_00000.safetensors")
    with open(shard, "r+b") as f:           # cut short, as a copy interrupted half way
        f.truncate(os.path.getsize(shard) // 2)
    open(shard + ".tmp123", "wb").write(b"left by a killed writer")
    capsys.readouterr()
    train.main([*args, "--out", str(tmp_path / "b")])
    assert "1 shards encoded now" in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == ["latents_00000.safetensors"]


def test_depth_runs_without_the_text_encoder(tmp_path):
    """Depth only needs the empty prompt's embedding: the 1.4 GB text encoder stays off the GPU."""
    from test_models import tiny_parts
    from checkpoint import save_sd_checkpoint
    unet, vae, text = tiny_parts("open_clip", context_dim=64)
    path = str(tmp_path / "with_text.safetensors")
    save_sd_checkpoint(path, unet, vae, text, metadata={"diff2flow.prediction_type": "v"})
    for task, has_text in (("depth", False), ("t2i", True)):
        args = train.parse_args(["--ckpt", path, "--task", task, "--data", str(tmp_path)])
        _, _, text_encoder, context, _, _ = train.build(args, lambda *a: None)
        assert (text_encoder is not None) == has_text and context.shape == (1, 77, 64)


def test_validation_runs_in_the_training_precision(tiny_ckpt, tmp_path, monkeypatch):
    import sample
    seen, real = [], sample.evaluate_heldout
    monkeypatch.setattr(sample, "evaluate_heldout", lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu")) or real(*a, **k))
    train.main(["--ckpt", tiny_ckpt, "--steps", "1", "--out", str(tmp_path / "r"), "--precision", "bf16", *FAST])
    assert seen and all(seen)


def test_the_ddp_model_is_compiled_not_the_unet(monkeypatch):
    """Compiling the UNet before DDP wraps it leaves backward and gradient communication unoverlapped."""
    import torch.nn.parallel
    compiled = []

    class FakeDDP(torch.nn.Module):
        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module = module
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    unet, _ = tiny_models("cpu")
    net, ddp = train.wrap(unet, 2, "cpu", True)
    assert isinstance(ddp, FakeDDP) and ddp.module is unet and compiled == [ddp]
    net, ddp = train.wrap(unet, 1, "cpu", False)
    assert net is ddp is unet
