"""Crash safety of run folders and bad input at the two command lines (issue #22).

Every error a user can cause is one line naming the file or flag and the fix; a run killed at any
moment keeps one complete checkpoint that --resume and sample.py --run both read."""
import argparse
import io
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import checkpoint
import data
import data_t2i
import lora
import sample
import text_encoder as te
import train
from checkpoint import latest_checkpoint, run_lora, save_sd_checkpoint, tidy_run
from lora import CONV_IN, companion_path, inject_lora, load_lora, read_metadata
from test_depth import FAST, read_log, tiny_ckpt  # noqa: F401  (the fixture)
from unet import UNetConfig, UNetModel, widen_input_conv
from vae import AutoencoderKL, VAEConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg.strip(), msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def cli_error(capsys, main, argv, *needles):
    """An argparse refusal: exit status 2 and one `error:` line naming what is wrong."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(("train.py: error:", "sample.py: error:", "__main__.py: error:", "pytest: error:")) \
        or "error:" in err[-1], err
    for n in needles:
        assert n in err[-1], f"{n!r} not in {err[-1]!r}"
    return err[-1]


# ---------------------------------------------------------------------------------------------------
# 1-2. Crash safety: a kill at every file-system step of a checkpoint save

class Killed(BaseException):
    """Stands in for SIGKILL: a BaseException, so no `except Exception` cleanup runs (none may be needed)."""


def small_run_parts():
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,),
                                context_dim=16, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True))
    widen_input_conv(unet, 8)
    inject_lora(unet, 2, full_train=(CONV_IN,))
    opt = torch.optim.AdamW(list(train.trained_params(unet).values()), lr=1e-3)
    args = argparse.Namespace(task="depth", objective="diff2flow", norm="log", multires_noise=0.0, t_density="uniform",
                              lora_targets="conv,attn,ff,proj", ema=0.0)
    info = dict(family="tiny", prediction="v", zero_snr=True, ckpt="tiny.safetensors", res=(32, 32))
    return unet, opt, args, info


def take_a_step(unet, opt, seed):
    """Change every trained tensor (and the optimizer state), so each checkpoint is told apart."""
    g = torch.Generator().manual_seed(seed)
    for p in train.trained_params(unet).values():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


class FileSystemKiller:
    """Counts the file-system operations of a save; at number `at` it dies, a write leaving half a file."""
    def __init__(self, monkeypatch, at=None):
        self.n, self.at = 0, at
        real = dict(replace=os.replace, rename=os.rename, link=os.link, remove=os.remove, makedirs=os.makedirs,
                    rmtree=shutil.rmtree, torch_save=torch.save, save_file=lora.save_file)

        def op(name, fn, torn=None):
            def wrapped(*a, **k):
                self.n += 1
                if self.n - 1 == self.at:
                    if torn:
                        torn(*a, **k)
                    raise Killed(name)
                return fn(*a, **k)
            return wrapped

        def torn_torch(obj, path, *a, **k):
            buf = io.BytesIO()
            real["torch_save"](obj, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])

        def torn_safetensors(tensors, path, metadata=None):
            from safetensors.torch import save
            blob = save(tensors, metadata)
            with open(path, "wb") as f:
                f.write(blob[: len(blob) // 2])

        for mod, attr, key in ((os, "replace", "replace"), (os, "rename", "rename"), (os, "link", "link"),
                               (os, "remove", "remove"), (os, "makedirs", "makedirs"), (shutil, "rmtree", "rmtree")):
            monkeypatch.setattr(mod, attr, op(key, real[key]))
        monkeypatch.setattr(torch, "save", op("torch.save", real["torch_save"], torn_torch))
        monkeypatch.setattr(lora, "save_file", op("save_file", real["save_file"], torn_safetensors))


def checkpoint_step(ckpt):
    """The step of a checkpoint folder, checking that its files all belong to that one step."""
    state = torch.load(os.path.join(ckpt, train.STATE_FILE), weights_only=True)
    lora_path = os.path.join(ckpt, train.LORA_FILE)
    assert read_metadata(lora_path)["diff2flow.step"] == str(state["step"])
    assert read_metadata(companion_path(lora_path))["diff2flow.step"] == str(state["step"])
    return state["step"]


def test_a_kill_at_any_point_of_a_save_leaves_one_complete_checkpoint(tmp_path, monkeypatch):
    unet, opt, args, info = small_run_parts()
    before = str(tmp_path / "before")
    take_a_step(unet, opt, 1)
    train.save_run(before, unet, opt, None, 2, args, info)
    take_a_step(unet, opt, 2)
    with monkeypatch.context() as m:            # count the file-system steps of one save
        counter = FileSystemKiller(m)
        train.save_run(str(tmp_path / "count"), unet, opt, None, 4, args, info)
    assert counter.n >= 8
    seen = set()
    for k in range(counter.n + 1):
        run = str(tmp_path / f"kill{k}")
        shutil.copytree(before, run)
        with monkeypatch.context() as m:
            FileSystemKiller(m, at=k)
            try:
                train.save_run(run, unet, opt, None, 4, args, info)
            except Killed:
                pass
        ckpt = latest_checkpoint(run)
        step = checkpoint_step(ckpt)             # one complete set, all of one step
        seen.add(step)
        # what sample.py --run reads is that set
        assert read_metadata(run_lora(run))["diff2flow.step"] == str(step)
        fresh = small_run_parts()[0]
        load_lora(run_lora(run), fresh)
        # the top-level convenience pair is either one save's or refused by name, never silently mixed
        try:
            load_lora(os.path.join(run, train.LORA_FILE), small_run_parts()[0])
        except ValueError as e:
            assert "belongs to another save" in str(e)
        # what --resume does first: temporary files go, the top-level pair is the latest's again
        tidy_run(run)
        assert not [f for f in os.listdir(run) if ".tmp" in f or ".del" in f], (k, os.listdir(run))
        top = os.path.join(run, train.LORA_FILE)
        assert read_metadata(top)["diff2flow.step"] == read_metadata(companion_path(top))["diff2flow.step"] == str(step)
        # and the run saves again
        train.save_run(run, unet, opt, None, 6, args, info)
        assert checkpoint_step(latest_checkpoint(run)) == 6
    assert seen == {2, 4}                        # kills before and after the switch were both tried


def test_old_checkpoints_are_pruned_and_stale_steps_replaced(tmp_path):
    unet, opt, args, info = small_run_parts()
    run = str(tmp_path / "run")
    for step in (2, 4, 6):
        take_a_step(unet, opt, step)
        train.save_run(run, unet, opt, None, step, args, info)
    kept = sorted(f for f in os.listdir(run) if f.startswith("ckpt_"))
    assert kept == ["ckpt_000004", "ckpt_000006"] and len(kept) == checkpoint.KEEP_CHECKPOINTS
    assert open(os.path.join(run, "latest")).read().strip() == "ckpt_000006"
    # a fresh run in the same folder: from its first save on, nothing of the old run is read
    train.save_run(run, unet, opt, None, 2, args, info)
    assert latest_checkpoint(run).endswith("ckpt_000002") and not os.path.exists(os.path.join(run, "ckpt_000006"))


KILL_CHILD = textwrap.dedent("""
    import io, os, signal, sys, torch
    sys.path.insert(0, {here!r})
    import train
    torch.set_num_threads({threads})          # the parent's: bit-exact comparisons need the same reduction order
    real, calls = torch.save, []
    def save(obj, path, *a, **k):            # the second checkpoint's state: half written, then SIGKILL
        calls.append(path)
        if len(calls) == 2:
            buf = io.BytesIO(); real(obj, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, path, *a, **k)
    torch.save = save
    train.main({argv!r})
""")


def test_sigkill_while_writing_then_resume_and_sample_agree(tiny_ckpt, tmp_path):
    """Killed while the step-4 state is half written: the run keeps step 2 whole (LoRA, companion, state);
    sample.py reads step 2; --resume removes the torn files and continues bit-exactly."""
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    common = ["--ckpt", tiny_ckpt, "--steps", "6", "--save-every", "2", *FAST]
    train.main([*common, "--out", straight])
    child = subprocess.run([sys.executable, "-c", KILL_CHILD.format(here=HERE, argv=[*common, "--out", killed],
                                                                   threads=torch.get_num_threads())],
                           cwd=HERE, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert child.returncode == -9, child.stderr[-2000:]
    assert [f for f in os.listdir(killed) if ".tmp" in f], os.listdir(killed)   # the torn write is there
    ckpt = latest_checkpoint(killed)
    assert checkpoint_step(ckpt) == 2
    loaded = sample.load_run(killed, tiny_ckpt)
    assert loaded.meta["diff2flow.step"] == "2"
    open(os.path.join(killed, "state.pt.tmp1"), "wb").close()     # pid 1 runs: another writer's, kept
    with open(os.path.join(killed, train.LOG_FILE), "a") as f:
        f.write('{"step": 3, "kind": "tra')                          # a log line torn by the kill
    train.main([*common, "--out", killed, "--resume"])
    steps = [r["step"] for r in read_log(killed) if r["kind"] == "train"]
    assert steps == [r["step"] for r in read_log(straight) if r["kind"] == "train"]   # one run, no repeats
    assert [f for f in os.listdir(killed) if ".tmp" in f or ".del" in f] == ["state.pt.tmp1"]
    for name in (train.LORA_FILE, "lora.full.safetensors"):
        a, b = load_file(os.path.join(straight, name)), load_file(os.path.join(killed, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert checkpoint_step(latest_checkpoint(killed)) == 6


# ---------------------------------------------------------------------------------------------------
# 3-5. Broken or mismatched files

def test_truncated_lora_is_one_line(tiny_ckpt, tmp_path):
    run = str(tmp_path / "run")
    train.main(["--ckpt", tiny_ckpt, "--steps", "1", "--out", run, *FAST])
    bad = str(tmp_path / "cut.safetensors")
    with open(run_lora(run), "rb") as f:
        blob = f.read()
    with open(bad, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ValueError) as e:
        sample.main(["--run", bad, "--ckpt", tiny_ckpt, "--num", "1", "--steps", "1", "--out", str(tmp_path / "o")])
    one_line_error(e, bad, "truncated")
    with pytest.raises(ValueError) as e:
        train.main(["--ckpt", tiny_ckpt, "--steps", "1", "--init-lora", bad, "--out", str(tmp_path / "r2"), *FAST])
    one_line_error(e, bad, "truncated")


def test_truncated_state_and_other_settings_on_resume(tiny_ckpt, tmp_path):
    run = str(tmp_path / "run")
    train.main(["--ckpt", tiny_ckpt, "--steps", "4", "--stop-at", "2", "--out", run, *FAST])
    # another LoRA rank: named, with the value the run was made with
    other = [a if a != "4" else "8" for a in FAST]
    with pytest.raises(ValueError) as e:
        train.main(["--ckpt", tiny_ckpt, "--steps", "4", "--out", run, "--resume", *other])
    one_line_error(e, "--lora-rank 4", "8")
    with pytest.raises(ValueError) as e:
        train.main(["--ckpt", tiny_ckpt, "--steps", "4", "--out", run, "--resume", "--objective", "fm", *FAST])
    one_line_error(e, "--objective diff2flow", "fm")
    state = os.path.join(latest_checkpoint(run), train.STATE_FILE)
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    with pytest.raises(ValueError) as e:
        train.main(["--ckpt", tiny_ckpt, "--steps", "4", "--out", run, "--resume", *FAST])
    one_line_error(e, state, "truncated")


def test_depth_lora_given_to_another_task_names_the_task(tiny_ckpt, tmp_path):
    run = str(tmp_path / "depth")
    train.main(["--ckpt", tiny_ckpt, "--steps", "1", "--out", run, *FAST])
    os.makedirs(tmp_path / "photos")
    depth_lora = run_lora(run)
    with pytest.raises(ValueError) as e:
        train.main(["--task", "t2i", "--data", str(tmp_path / "photos"), "--ckpt", tiny_ckpt, "--init-lora", depth_lora,
                    "--out", str(tmp_path / "t2i"), "--res", "32x32"])
    msg = one_line_error(e, depth_lora, "depth LoRA", "--task depth", "sample.py --run")
    assert "widen" not in msg
    # and a depth run can start from a depth LoRA (before: loaded before widening; any --init-lora under a
    # LoRA run then met "model already has LoRA layers")
    train.main(["--ckpt", tiny_ckpt, "--steps", "1", "--init-lora", depth_lora, "--out", str(tmp_path / "again"), *FAST])


# ---------------------------------------------------------------------------------------------------
# 6-10. Counts, rates, devices, folders and sizes, refused up front

@pytest.mark.parametrize("argv,flag", [
    (["--save-every", "0"], "--save-every"), (["--grad-accum", "0"], "--grad-accum"),
    (["--batch-size", "0"], "--batch-size"), (["--steps", "0"], "--steps"), (["--ema", "1.5"], "--ema"),
    (["--val-every", "0"], "--val-every"), (["--lora-rank", "-3"], "--lora-rank"), (["--lora-rank", "1.5"], "--lora-rank"),
    (["--lora-alpha", "0"], "--lora-alpha"), (["--res", "32by32"], "--res"), (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "gpu"], "--device"), (["--lr", "0"], "--lr")])
def test_train_refuses_bad_numbers_up_front(capsys, argv, flag):
    cli_error(capsys, train.parse_args, argv, flag)


@pytest.mark.parametrize("argv,flag", [
    (["--shard-size", "0"], "--shard-size"), (["--processing-res", "0"], "--processing-res"),
    (["--task", "t2i", "--res", "32by32"], "--res"), (["--device", "cuda:99"], "--device cuda:99")])
def test_sample_refuses_bad_numbers_up_front(capsys, argv, flag):
    cli_error(capsys, sample.main, argv, flag)


def test_out_naming_a_file_and_devices_that_exist(capsys, tmp_path, monkeypatch):
    f = tmp_path / "taken.txt"
    f.write_text("x")
    cli_error(capsys, sample.main, ["--out", str(f)], "--out", str(f), "folder")
    cli_error(capsys, train.parse_args, ["--out", str(f)], "--out", str(f), "folder")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cli_error(capsys, train.parse_args, ["--device", "cuda:99"], "2 CUDA device(s), cuda:0 to cuda:1")
    assert checkpoint.device_problem("cuda:1") is None and checkpoint.device_problem("cpu") is None


def test_command_line_prints_one_line(tmp_path):
    """sample.py's own exit path: a truncated LoRA file is one `error:` line, no traceback."""
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\"")
    out = subprocess.run([sys.executable, "sample.py", "--run", str(bad)], cwd=HERE, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0]


# ---------------------------------------------------------------------------------------------------
# 11. 16-bit images are the same picture as their 8-bit copy

def test_16bit_png_reads_as_its_8bit_copy(tmp_path):
    g8 = (np.random.default_rng(0).random((12, 10)) * 255).astype(np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")      # mode I;16
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    a, b = data.read_rgb(str(tmp_path / "g8.png")), data.read_rgb(str(tmp_path / "g16.png"))
    assert np.abs(a - b).max() < 1e-6
    assert torch.allclose(sample.read_image(str(tmp_path / "g8.png")), sample.read_image(str(tmp_path / "g16.png")), atol=1e-6)
    assert torch.allclose(data_t2i.load_rgb(str(tmp_path / "g8.png"), (8, 8)),
                          data_t2i.load_rgb(str(tmp_path / "g16.png"), (8, 8)), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# 12. A text encoder whose head count the file cannot tell

def test_text_encoder_width_not_a_multiple_of_64(tmp_path):
    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,),
                                context_dim=32, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True))
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1))
    text = te.TextEncoder(te.TextConfig(width=32, heads=4, layers=1, projection_dim=0, logit_scale=False))
    path = str(tmp_path / "m.safetensors")
    save_sd_checkpoint(path, unet, vae, text_encoder=text, metadata={"diff2flow.prediction_type": "v"})
    checkpoint.load_sd_checkpoint(path)                       # the writer records the heads: loads
    meta = read_metadata(path)
    del meta["diff2flow.text_heads"]                           # a foreign file: no text head count
    save_file(load_file(path), path, metadata=meta)
    with pytest.raises(ValueError) as e:
        checkpoint.load_sd_checkpoint(path)
    one_line_error(e, "width 32", "diff2flow.text_heads")


# ---------------------------------------------------------------------------------------------------
# 14. Per-layer alphas: diffusers reads one alpha for every attention projection

def test_fractional_rank_lora_loads_the_same_in_diffusers(tmp_path):
    """Rank 0.2 of each layer's width with alpha = rank per layer: the file holds one alpha and the same
    function, and diffusers' own kohya loader reproduces our output (it was 10%+ off before)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from test_lora import randomize_lora, rel, tiny_unet, tiny_unet_config, unet_inputs
    cfg, unet = tiny_unet_config(False), tiny_unet(False)     # SD1 layout (conv proj, fixed heads)
    ckpt = {"model.diffusion_model." + k: v.clone() for k, v in unet.state_dict().items()}
    ldm = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=list(cfg.channel_mult), num_res_blocks=1,
               attention_resolutions=[1], transformer_depth=1, context_dim=24, use_linear_in_transformer=False, num_heads=2)
    original = {"model": {"params": {"unet_config": {"params": ldm},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    dcfg = create_unet_diffusers_config_from_ldm(original, ckpt)
    dunet = UNet2DConditionModel(**dcfg)
    dunet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dcfg), strict=True)
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        base_out = unet(x, t, ctx)
    names = inject_lora(unet, 0.2, targets=tuple(lora.TARGETS))
    assert len({m.alpha for _, m in lora.lora_layers(unet)}) > 2   # the per-layer alphas differ
    randomize_lora(unet, 1, std=0.1)
    with torch.no_grad():                                      # the layer diffusers cannot place (see test_lora)
        unet.get_submodule("output_blocks.1.1.conv").lora_up.weight.zero_()
    path = str(tmp_path / "frac.safetensors")
    lora.save_lora(path, unet, lora.lora_metadata("sd1", "eps"))
    sd = load_file(path)
    assert len({float(v) for k, v in sd.items() if k.endswith(".alpha")}) == 1
    with torch.no_grad():
        ours = unet(x, t, ctx)
        mine = tiny_unet(False)
        load_lora(path, mine)
        assert rel(mine(x, t, ctx), ours) < 1e-6               # our loader: the same function
        state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(sd, unet_config=dunet.config)
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, dunet)
        theirs = dunet(x, t, encoder_hidden_states=ctx).sample
    err, effect = rel(theirs, ours), rel(ours, base_out)
    print(f"rank 0.2, alpha = rank per layer: diffusers vs ours rel err {err:.2e}, LoRA effect {effect:.2e}, "
          f"{len(names)} layers")
    assert effect > 1e-2 and err < 1e-4
