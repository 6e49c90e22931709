"""End-to-end tests of the depth task: train.py and sample.py on tiny checkpoints and rendered scenes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import depth_eval
import sample
import tasks
import train
from checkpoint import TINY_PRIOR, native_res, save_sd_checkpoint
from unet import UNetConfig, UNetModel, widen_input_conv
from vae import AutoencoderKL, VAEConfig

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--res", "32x32", "--train-scenes", "16", "--batch-size", "2", "--lora-rank", "4", "--val-every", "1000",
        "--report-scenes", "4"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny SD-layout checkpoint with every parameter random (no text encoder: an empty-prompt tensor)."""
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_levels=(1,),
                                context_dim=32, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True))
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    with torch.no_grad():
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.copy_(torch.randn_like(p) * 0.1)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    save_sd_checkpoint(path, unet, vae, empty_context=torch.randn(1, 77, 32), metadata={"diff2flow.prediction_type": "v"})
    return path


def read_log(run):
    with open(os.path.join(run, train.LOG_FILE)) as f:
        return [json.loads(line) for line in f]


def no_temp_files(folder):
    return not [f for f in os.listdir(folder) if ".tmp" in f]


def test_a_tiny_prior_trains_at_the_size_it_records(tiny_ckpt, tmp_path):
    """tiny.py records its training size ("diff2flow.res"); runs on it default to that size and record their
    own, which sample.py then reads. A file without the key (the first bundled prior) means 96x128."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from checkpoint import run_lora
    from lora import read_metadata
    with safe_open(tiny_ckpt, "pt") as f:
        meta = dict(f.metadata() or {})
    path = str(tmp_path / "sized.safetensors")
    save_file(load_file(tiny_ckpt), path, metadata={**meta, "diff2flow.res": "16x24"})
    few = ["--steps", "1", "--train-scenes", "2", "--batch-size", "2", "--lora-rank", "4", "--val-items", "2",
           "--val-every", "1000", "--report-scenes", "0"]
    for ckpt, want in ((path, "16x24"), (tiny_ckpt, "96x128")):
        run = str(tmp_path / ("run_" + want))
        train.main(["--ckpt", ckpt, "--out", run, *few])
        assert read_metadata(run_lora(run))["diff2flow.res"] == want
        assert native_res(sample.load_run(run, ckpt).meta, None) == tuple(int(v) for v in want.split("x"))


def test_resume_continues_exactly(tiny_ckpt, tmp_path, capsys):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.main(["--ckpt", tiny_ckpt, "--steps", "6", "--out", straight, *FAST])
    train.main(["--ckpt", tiny_ckpt, "--steps", "6", "--stop-at", "3", "--out", resumed, *FAST])
    assert load_file(os.path.join(resumed, train.LORA_FILE)).keys()     # a usable LoRA after the first half
    capsys.readouterr()
    train.main(["--ckpt", tiny_ckpt, "--steps", "6", "--out", resumed, "--resume", *FAST])
    # the final table: the untouched prior and the trivial baseline reported at step 0, the model at the
    # end of the schedule (not where --stop-at paused it), in sample.py's protocol
    reports = [(r["kind"], r["step"]) for r in read_log(resumed) if r["kind"].startswith("report")]
    assert reports == [("report_trivial", 0), ("report", 0), ("report", 6)]
    # each table row says how it was read: results.py refuses rows read another way
    assert {(r["steps"], r["ensemble"]) for r in read_log(resumed) if r["kind"] == "report"} == {(1, tasks.REPORT_ENSEMBLE)}
    out = capsys.readouterr().out
    assert f"4 items, 1 steps, ensemble {tasks.REPORT_ENSEMBLE}" in out
    assert "next: python sample.py --steps 1" in out
    assert "finetuned (diff2flow, step 6)" in out
    for name in (train.LORA_FILE, "lora.full.safetensors"):
        a, b = load_file(os.path.join(straight, name)), load_file(os.path.join(resumed, name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # and training did change the weights (the LoRA up matrices start at zero)
    ups = [v for k, v in load_file(os.path.join(straight, train.LORA_FILE)).items() if k.endswith("lora_up.weight")]
    assert any(u.abs().max() > 0 for u in ups)
    assert no_temp_files(straight) and no_temp_files(resumed)


@pytest.mark.parametrize("objective", ["diffusion", "fm"])
def test_baseline_objectives_train_and_record_their_metadata(tiny_ckpt, tmp_path, objective):
    run = str(tmp_path / objective)
    train.main(["--ckpt", tiny_ckpt, "--steps", "2", "--objective", objective, "--out", run, *FAST])
    meta = sample.read_metadata(os.path.join(run, train.LORA_FILE))
    assert meta["diff2flow.objective"] == objective and meta["diff2flow.zero_snr"] == "False"
    assert meta["diff2flow.unet_in_channels"] == "8" and meta["diff2flow.task"] == "depth"
    losses = [r["loss"] for r in read_log(run) if r["kind"] == "train"]
    assert losses and all(np.isfinite(losses))


def test_ddp_two_ranks_end_identical(tiny_ckpt, tmp_path):
    run = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(HERE, "train.py"), "--ckpt", tiny_ckpt, "--steps", "3", "--out", run, "--device", "cpu", *FAST]
    out = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ddp = [r for r in read_log(run) if r["kind"] == "ddp"]
    assert ddp and ddp[0]["ranks"] == 2 and ddp[0]["max_diff"] == 0.0
    # every rank scored its half of the held-out set (rank 0 alone doing minutes of step-0 work while the
    # others wait in their first all-reduce can trip NCCL's watchdog)
    vals = [r for r in read_log(run) if r["kind"] in ("val", "report")]
    assert vals and all(r["items_this_rank"] * 2 == r["items"] for r in vals)


def test_sample_writes_marigold_outputs_at_the_input_size(tiny_ckpt, tmp_path):
    run = str(tmp_path / "run")
    train.main(["--ckpt", tiny_ckpt, "--steps", "1", "--out", run, *FAST])
    img = (np.random.default_rng(0).random((45, 70, 3)) * 255).astype(np.uint8)   # odd size and aspect
    Image.fromarray(img).save(tmp_path / "photo.png")
    out = str(tmp_path / "out")
    sample.main(["--run", run, "--ckpt", tiny_ckpt, "--input", str(tmp_path / "photo.png"), "--out", out,
                 "--steps", "2", "--ensemble", "2", "--processing-res", "32"])
    pred = np.load(os.path.join(out, "photo_pred.npy"))
    assert pred.shape == (45, 70) and pred.dtype == np.float32 and 0 <= pred.min() and pred.max() <= 1
    with Image.open(os.path.join(out, "photo_pred.png")) as png16:
        assert png16.mode in ("I;16", "I") and png16.size == (70, 45)
        assert np.abs(np.asarray(png16, np.float64) / 65535 - pred).max() <= 1 / 65535
    for suffix in ("pred_colored", "uncertainty"):
        with Image.open(os.path.join(out, f"photo_{suffix}.png")) as im:
            assert im.size == (70, 45)
    assert no_temp_files(out)


def test_processing_size_keeps_aspect_and_multiples():
    assert sample.processing_size(480, 640, 512, 64) == (384, 512)
    h, w = sample.processing_size(1000, 333, 768, 64)
    assert h == 768 and w % 64 == 0 and abs(w / h - 333 / 1000) < 64 / 768


def test_colorize_is_spectral_near_warm():
    c = sample.colorize(np.array([[-1.0, 1.0]]))
    assert tuple(c[0, 0]) == tuple(sample.SPECTRAL[0]) and tuple(c[0, 1]) == tuple(sample.SPECTRAL[-1])
    assert c[0, 0, 0] > c[0, 0, 2] and c[0, 1, 2] > c[0, 1, 0]     # near red, far blue


# --- bad input: one clear line naming the file or value ---------------------------------------------

def test_unknown_task_or_objective_is_a_clear_error(capsys):
    for flag, value in (("--task", "segmentation"), ("--objective", "rectified")):
        with pytest.raises(SystemExit):
            train.parse_args([flag, value])
        assert f"unknown {flag[2:]} {value!r}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--report-steps", "0"])
    assert "--report-steps 0: at least 1 sampling step" in capsys.readouterr().err


def test_missing_files_and_bad_images_are_named(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        train.main(["--ckpt", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "r"), *FAST])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        sample.read_image(str(bad))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no images"):
        sample.list_inputs(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no trained depth run"):
        sample.newest_run(str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="no state.pt"):
        train.main(["--ckpt", tiny_ckpt, "--out", str(tmp_path / "fresh"), "--resume", *FAST])
    with pytest.raises(FileNotFoundError, match="missing data set folder"):
        train.main(["--ckpt", tiny_ckpt, "--hypersim", str(tmp_path / "no_hypersim"), "--out", str(tmp_path / "r2"), *FAST])


def test_command_line_errors_are_one_line(tmp_path):
    """The scripts turn bad input into `error: ...` on stderr and exit 1, not a traceback."""
    out = subprocess.run([sys.executable, "train.py", "--ckpt", str(tmp_path / "missing.safetensors")], cwd=HERE,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error:") and "missing.safetensors" in out.stderr


def test_finetuning_the_tiny_prior_improves_heldout_depth(tmp_path):
    """End to end on the bundled tiny prior: AbsRel on 256 held-out scenes (never trained on) drops below
    the untouched prior's after the README's demo cut to 400 steps of batch 8 (LoRA rank 64, multi-resolution noise,
    logit-normal times: the README's depth section says why the tiny prior needs both)."""
    import data
    run = str(tmp_path / "tiny")
    train.main(["--ckpt", TINY_PRIOR, "--steps", "400", "--batch-size", "8", "--lora-rank", "64", "--train-scenes", "1000", "--val-steps", "1",
                "--val-every", "1000", "--report-scenes", "0", "--out", run])
    m, prior = sample.load_run(run, TINY_PRIOR), sample.load_run(None, TINY_PRIOR)
    heldout = data.RenderedDepthDataset.split("heldout", 256, *native_res(m.meta, None))   # the run's size, recorded
    source = float(m.meta["diff2flow.multires_noise"])      # the strength the run recorded

    def score(loaded, unet):   # one Euler step from the same noise: the model's E[depth | image]
        return depth_eval.evaluate(lambda rgb: sample.predict_depth(unet, loaded.vae, m.d2f, loaded.context, rgb, steps=1,
                                                                multires=source)[0], heldout)["abs_rel"]

    before, after = score(prior, widen_input_conv(prior.unet, 8)), score(m, m.unet)
    print(f"held-out AbsRel (256 scenes): untouched prior {before:.4f}, after 400 steps {after:.4f}")
    assert after < before - 0.02           # measured: 0.337 -> 0.294 (fourth prior; the third: 0.351 -> 0.323)


def test_multires_noise_trains_and_samples_from_the_same_source(tiny_ckpt, tmp_path, monkeypatch):
    run = str(tmp_path / "multires")
    seen = []
    real = sample.multires_noise

    def spy(shape, strength, generator=None):
        seen.append(strength)
        return real(shape, strength, generator)

    monkeypatch.setattr(tasks, "multires_noise", spy)
    train.main(["--ckpt", tiny_ckpt, "--steps", "2", "--multires-noise", "0.9", "--out", run, *FAST])
    assert seen.count(0.9) == 2                              # one draw per training step
    assert sample.read_metadata(os.path.join(run, train.LORA_FILE))["diff2flow.multires_noise"] == "0.9"
    seen.clear()
    monkeypatch.setattr(sample, "multires_noise", spy)
    sample.main(["--run", run, "--ckpt", tiny_ckpt, "--num", "2", "--steps", "1", "--out", str(tmp_path / "out")])
    assert seen and set(seen) == {0.9}                       # sampling starts from what training used
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "t2i", "--data", str(tmp_path), "--multires-noise", "0.9"])
    default = str(tmp_path / "default")                   # no flag: the tiny prior's defaults, recorded
    train.main(["--ckpt", tiny_ckpt, "--steps", "1", "--out", default, *FAST])
    meta = sample.read_metadata(os.path.join(default, train.LORA_FILE))
    assert meta["diff2flow.multires_noise"] == "0.9" and meta["diff2flow.t_density"] == "logit-normal:-3"


def test_t_density_flag(tiny_ckpt, tmp_path, monkeypatch):
    """--t-density reaches Diff2Flow.sample_t each step; bad specs and the diffusion objective are refused."""
    assert train.t_density("uniform") is None
    assert train.t_density("logit-normal:-2") == (-2.0, 1.0) and train.t_density("logit-normal:0.5:2") == (0.5, 2.0)
    for bad in ("logit-normal", "logit-normal:a", "logit-normal:0:-1", "normal:0"):
        with pytest.raises(SystemExit):
            train.parse_args(["--t-density", bad])
    with pytest.raises(SystemExit):
        train.parse_args(["--objective", "diffusion", "--t-density", "logit-normal:-2"])
    seen = []
    real = train.Diff2Flow.sample_t

    def spy(self, n, device=None, logit_normal=None):
        seen.append(logit_normal)
        return real(self, n, device, logit_normal)

    monkeypatch.setattr(train.Diff2Flow, "sample_t", spy)
    run = str(tmp_path / "ln")
    train.main(["--ckpt", tiny_ckpt, "--steps", "2", "--t-density", "logit-normal:1:0.5", "--out", run, *FAST])
    assert seen == [(1.0, 0.5)] * 2
    assert sample.read_metadata(os.path.join(run, train.LORA_FILE))["diff2flow.t_density"] == "logit-normal:1:0.5"
