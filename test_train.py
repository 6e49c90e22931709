"""The SD training path (issue: the paper's depth run): device-clean hot paths, the data stream, the
latent cache, defaults, DDP on gloo, and LoRA target sets. Tiny models with every parameter random."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
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
    img, dep, mask = train.encode_depth_items(vae, items, "log", "meta")
    assert img.device.type == dep.device.type == mask.device.type == "meta"
    model = conditioned(unet, torch.empty(2, 77, 32, device="meta"), concat=img)
    loss = d2f.loss(model, dep, objective, mask=mask).mean()
    loss.backward()
    assert loss.device.type == "meta" and unet.out[2].weight.grad.device.type == "meta"
