"""Importers: official DDIM ckpt.pth (built locally in the official layout), diffusers UNet2DModel
folders (diffusers is optional), pickle safety, and the `ddim-fast convert` command."""

import argparse
import copy
import dataclasses
import json
import os
import pickle
import warnings

import pytest
import torch

import ddim_fast as dd
from ddim_fast import checkpoint as ck
from ddim_fast import cli
from ddim_fast.cli.convert import Convert
from ddim_fast.models import convert as cv
from ddim_fast.models.unet import UNet, UNetConfig
from ddim_fast.schedule import NoiseSchedule
from tests.helpers import MarkerPayload, assert_close_to_reference, text_unet

# Loading an official file without its YAML guesses the image size and says so (tested below).
pytestmark = pytest.mark.filterwarnings("ignore:.*the weights do not determine the image size")

# The official code always uses GroupNorm(32): the tiny preset's shapes with 32 groups.
OFFICIAL_CFG = UNetConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                          dropout=0.0)
X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
T = torch.tensor([5, 740])


def random_weights(config, seed):
    torch.manual_seed(seed)
    m = UNet(config)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def reference_output(config, state_dict, x=X, t=T):
    m = UNet(config).eval()
    m.load_state_dict(state_dict)
    with torch.no_grad():
        return m(x, t)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_official(path, raw: dict, ema: dict | None, ema_prefix: bool = False):
    """An official DDIM runner's ckpt.pth: [model (DataParallel), optimizer, epoch, step, ema shadow]."""
    model = UNet(OFFICIAL_CFG)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    model(X[:1, :, :8, :8], T[:1]).square().mean().backward()
    opt.step()  # a real Adam state: step counters, moments, param groups
    states = [{f"module.{k}": v for k, v in raw.items()}, opt.state_dict(), 7, 1234]
    if ema is not None:
        states.append({(f"module.{k}" if ema_prefix else k): v for k, v in ema.items()})
    torch.save(states, path)
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    raw = random_weights(OFFICIAL_CFG, 0).state_dict()
    ema = random_weights(OFFICIAL_CFG, 1).state_dict()
    path = write_official(tmp_path_factory.mktemp("official") / "ckpt.pth", raw, ema)
    return path, raw, ema


# -- official checkpoints ------------------------------------------------------------------------------
def test_official_list_loads_and_runs(official):
    path, raw, ema = official
    m = cv.load_official(path)
    assert m.config == OFFICIAL_CFG and not m.training and m.prediction == "eps"
    assert same_weights(m.state_dict(), ema)
    assert torch.equal(m.schedule.alphas_cumprod, NoiseSchedule.linear(1000, 1e-4, 0.02).alphas_cumprod)
    info = m.checkpoint_info
    assert info["ema"] is True and info["has_ema"] is True and info["epoch"] == 7 and info["step"] == 1234
    with torch.no_grad():
        out = m(X, T)
    assert torch.equal(out, reference_output(OFFICIAL_CFG, ema))
    assert not torch.allclose(out, reference_output(OFFICIAL_CFG, raw), atol=1e-3)


def test_official_raw_weights_on_request(official):
    path, raw, ema = official
    assert same_weights(cv.load_official(path, ema=False).state_dict(), raw)
    assert same_weights(dd.load_model(path).state_dict(), ema)
    assert same_weights(dd.load_model(path, ema=False).state_dict(), raw)


def test_official_ema_with_prefix_and_logvar(tmp_path):
    raw = random_weights(OFFICIAL_CFG, 2).state_dict()
    ema = {**random_weights(OFFICIAL_CFG, 3).state_dict(), "logvar": torch.zeros(1000)}
    path = write_official(tmp_path / "ckpt.pth", {**raw, "logvar": torch.zeros(1000)}, ema, ema_prefix=True)
    m = cv.load_official(path)
    ema.pop("logvar")
    assert same_weights(m.state_dict(), ema)


def test_official_without_ema_warns_and_uses_raw(tmp_path):
    raw = random_weights(OFFICIAL_CFG, 4).state_dict()
    path = write_official(tmp_path / "ckpt.pth", raw, None)
    with pytest.warns(UserWarning, match="has no EMA weights; loading the raw training weights"):
        m = cv.load_official(path)
    assert same_weights(m.state_dict(), raw) and m.checkpoint_info["ema"] is False


def test_official_bare_state_dict(tmp_path):
    raw = random_weights(OFFICIAL_CFG, 5).state_dict()
    torch.save(raw, tmp_path / "model-790000.ckpt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*EMA")  # a bare dict is not "missing" its EMA: no warning
        m = dd.load_model(tmp_path / "model-790000.ckpt")
    assert same_weights(m.state_dict(), raw)
    assert m.checkpoint_info["layout"].startswith("bare state dict")


def test_official_yaml_config(tmp_path, official):
    path, _, ema = official
    yml = tmp_path / "cifar_like.yml"
    yml.write_text(
        "data:\n  image_size: 16\n  channels: 3\n"
        "model:\n  type: simple\n  in_channels: 3\n  out_ch: 3\n  ch: 32\n  ch_mult: [1, 2]\n"
        "  num_res_blocks: 1\n  attn_resolutions: [8, ]\n  dropout: 0.0\n  resamp_with_conv: True\n"
        "diffusion:\n  beta_schedule: quad\n  beta_start: 0.0001\n  beta_end: 0.02\n"
        "  num_diffusion_timesteps: 500\n"
    )
    m = cv.load_official(path, config=yml)
    assert m.config == OFFICIAL_CFG and same_weights(m.state_dict(), ema)
    assert m.schedule.T == 500 and m.schedule.spec["kind"] == "scaled_linear"
    # The official "quad" schedule: linspace of sqrt(beta), squared.
    expect = torch.linspace(0.0001**0.5, 0.02**0.5, 500, dtype=torch.float64) ** 2
    torch.testing.assert_close(m.schedule.betas, expect, rtol=1e-12, atol=0)
    assert cv.load_official(path, config=OFFICIAL_CFG).config == OFFICIAL_CFG


def test_official_yaml_that_does_not_fit(tmp_path, official):
    path = official[0]
    yml = tmp_path / "wrong.yml"
    yml.write_text("data: {image_size: 32}\nmodel: {in_channels: 3, out_ch: 3, ch: 64, ch_mult: [1, 2, 2], "
                   "num_res_blocks: 2, attn_resolutions: [16]}\n")
    with pytest.raises(ValueError) as e:
        cv.load_official(path, config=yml)
    msg = str(e.value)
    assert "do not fit UNetConfig(" in msg and "missing (" in msg and "mis-shaped (" in msg
    assert "ch=32, ch_mult=(1, 2), num_res_blocks=1" in msg and "UNetConfig.tiny()" in msg
    with pytest.raises(ValueError, match="lacks 'in_channels'"):
        cv.read_official_yaml({"model": {}, "data": {}})
    with pytest.raises(FileNotFoundError, match="no config file"):
        cv.load_official(path, config=tmp_path / "missing.yml")


def test_official_wrong_architecture(tmp_path):
    raw = random_weights(OFFICIAL_CFG, 6).state_dict()
    raw.pop("mid.attn_1.q.weight")
    raw["conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    path = write_official(tmp_path / "ckpt.pth", raw, None)
    with pytest.raises(ValueError) as e:
        cv.load_official(path, ema=False)
    msg = str(e.value)
    assert "missing (1): mid.attn_1.q.weight" in msg
    assert "mis-shaped (1): conv_out.weight (3, 16, 3, 3) vs model (3, 32, 3, 3)" in msg
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DDPM UNet in the official key layout"):
        cv.load_official(tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not an official DDIM checkpoint"):
        cv.load_official(tmp_path / "list.pth")


# -- pickle safety ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pth"
    payload = [{"conv_in.weight": torch.zeros(1)}, MarkerPayload(marker), 0, 0]
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    for load in (cv.load_official, dd.load_model, lambda p: ck.convert(p, tmp_path / "out")):
        with pytest.raises(cv.UnsafeCheckpointError) as e:
            load(path)
        assert str(path) in str(e.value) and "safetensors" in str(e.value) and "refusing" in str(e.value)
        assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_malicious_diffusers_bin_is_refused(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(DDPM_CIFAR10_CONFIG))
    torch.save({"x": MarkerPayload(tmp_path / "pwned")}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(cv.UnsafeCheckpointError, match="diffusion_pytorch_model.bin"):
        dd.load_model(folder)
    assert not (tmp_path / "pwned").exists()


def test_unreadable_files(tmp_path):
    # Some garbage stops the safe unpickler at its first byte (a refusal), some earlier.
    (tmp_path / "a.pth").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(cv.UnsafeCheckpointError, match="or it is not a PyTorch checkpoint at all"):
        cv.load_official(tmp_path / "a.pth")
    (tmp_path / "b.pth").write_bytes(b"hello world garbage")
    with pytest.raises(ValueError, match="cannot read .* as a PyTorch checkpoint"):
        cv.load_official(tmp_path / "b.pth")


# -- diffusers ---------------------------------------------------------------------------------------------
# google/ddpm-cifar10-32's UNet2DModel config (what the model card's config.json says).
DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
SMALL_CONFIG = {**DDPM_CIFAR10_CONFIG, "block_out_channels": [32, 64, 64, 64]}  # same layout, CI-sized


def make_diffusers(config, seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    m = diffusers.UNet2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:  # norms and biases away from their init (weights 1, biases 0)
                p.add_(0.3 * torch.randn_like(p))
    return m


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def compare_with_diffusers(theirs, ours, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    for t in ([0, 0], [1, 1], [500, 500], [999, 999], [3, 871]):
        t = torch.tensor(t)
        with torch.no_grad():
            want = theirs(x, t).sample
            got = ours(x, t)
        assert want.abs().max() > 0.1
        assert relative_error(got, want) <= 1e-5, (t, relative_error(got, want))


@pytest.fixture(scope="module")
def small_diffusers(tmp_path_factory):
    m = make_diffusers(SMALL_CONFIG)
    folder = tmp_path_factory.mktemp("diffusers") / "ddpm-small"
    m.save_pretrained(folder)
    return m, folder


def test_diffusers_folder_matches_diffusers(small_diffusers):
    theirs, folder = small_diffusers
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    ours = cv.load_diffusers(folder)
    assert ours.config == UNetConfig(ch=32, ch_mult=(1, 2, 2, 2), dropout=0.0)
    assert ours.prediction == "eps" and ours.schedule.spec == cv.OFFICIAL_SCHEDULE
    compare_with_diffusers(theirs, ours, 16)  # the networks are size-agnostic; 16x16 keeps CI fast
    assert same_weights(dd.load_model(folder).state_dict(), ours.state_dict())


def test_diffusers_bin_and_old_attention_names(small_diffusers, tmp_path):
    from safetensors.torch import save_file

    theirs, folder = small_diffusers
    ours = cv.load_diffusers(folder)
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    assert same_weights(cv.load_diffusers(tmp_path / "bin").state_dict(), ours.state_dict())
    # Hub files from older diffusers name the attention layers query/key/value/proj_attn.
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for k, v in theirs.state_dict().items():
        for new_name, old_name in renames.items():
            k = k.replace(new_name, old_name)
        old[k] = v.contiguous()
    assert any(".query." in k for k in old)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(SMALL_CONFIG))
    save_file(old, str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
    assert same_weights(cv.load_diffusers(tmp_path / "old").state_dict(), ours.state_dict())


def test_diffusers_pipeline_folder_brings_its_schedule(small_diffusers, tmp_path):
    theirs, _ = small_diffusers
    pipe = tmp_path / "pipe"
    theirs.save_pretrained(pipe / "unet")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    }))
    (pipe / "model_index.json").write_text("{}")
    for path in (pipe, pipe / "unet"):
        m = dd.load_model(path)
        assert m.prediction == "v" and m.schedule.spec["kind"] == "scaled_linear"
        assert m.schedule.spec["beta_end"] == 0.012
    assert cv.diffusers_schedule({"beta_schedule": "squaredcos_cap_v2"})[0].spec["kind"] == "cosine"
    with pytest.raises(ValueError, match="unsupported diffusers beta_schedule 'sigmoid'"):
        cv.diffusers_schedule({"beta_schedule": "sigmoid"})


@pytest.mark.parametrize("change, message", [
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos=True .*cosines before sines"),
    ({"downsample_padding": 1}, "downsample_padding=1 .*symmetric padding"),
    ({"attention_head_dim": 8}, r"attention_head_dim=8 \(it splits attention into 32 heads at width 256"),
    ({"resnet_time_scale_shift": "scale_shift"}, "scale-shift"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
     "unsupported block types"),
    ({"_class_name": "UNet2DConditionModel"}, "expected a diffusers UNet2DModel"),
])
def test_diffusers_configs_of_other_networks_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        cv.diffusers_config({**DDPM_CIFAR10_CONFIG, **change})


def test_diffusers_missing_keys_default_like_diffusers():
    # A config.json without freq_shift means diffusers' default 0: a different embedding.
    cfg = {k: v for k, v in DDPM_CIFAR10_CONFIG.items() if k != "freq_shift"}
    with pytest.raises(ValueError, match="freq_shift=0"):
        cv.diffusers_config(cfg)
    assert cv.diffusers_config(DDPM_CIFAR10_CONFIG) == UNetConfig(dropout=0.0)


def test_diffusers_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    with torch.device("meta"):
        ours = UNet(cv.diffusers_config(SMALL_CONFIG))
    names = {cv.diffusers_key(k, 4): tuple(v.shape) for k, v in ours.state_dict().items()}
    weights = {k: torch.zeros(s[:2] if k.endswith(("to_q.weight", "to_out.0.weight")) else s)
               for k, s in names.items()}
    weights.pop("conv_norm_out.weight")
    weights["down_blocks.0.resnets.0.conv1.weight"] = torch.zeros(32, 3, 3, 3)
    weights["class_embedding.weight"] = torch.zeros(10, 128)
    (tmp_path / "config.json").write_text(json.dumps(SMALL_CONFIG))
    save_file(weights, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError) as e:
        cv.load_diffusers(tmp_path)
    msg = str(e.value)
    assert "missing (1): conv_norm_out.weight" in msg
    assert "unexpected (1): class_embedding.weight" in msg
    assert "mis-shaped (1): down_blocks.0.resnets.0.conv1.weight (32, 3, 3, 3) vs (32, 32, 3, 3)" in msg


def test_diffusers_key_map_is_a_bijection():
    for name in ("cifar10", "celeba", "lsun"):
        with torch.device("meta"):
            keys = list(UNet(UNetConfig.preset(name)).state_dict())
        mapped = [cv.diffusers_key(k, len(UNetConfig.preset(name).ch_mult)) for k in keys]
        assert len(set(mapped)) == len(keys)
    assert cv.diffusers_key("up.3.block.0.nin_shortcut.weight", 4) == "up_blocks.0.resnets.0.conv_shortcut.weight"
    assert cv.diffusers_key("mid.attn_1.proj_out.bias", 4) == "mid_block.attentions.0.to_out.0.bias"
    assert cv.diffusers_key("up.1.upsample.conv.weight", 4) == "up_blocks.2.upsamplers.0.conv.weight"
    assert cv.diffusers_key("temb.dense.1.weight", 4) == "time_embedding.linear_2.weight"


@pytest.mark.slow
def test_full_size_ddpm_cifar10_matches_diffusers(tmp_path):
    theirs = make_diffusers(DDPM_CIFAR10_CONFIG, seed=1)
    theirs.save_pretrained(tmp_path / "ddpm-cifar10-32")
    ours = cv.load_diffusers(tmp_path / "ddpm-cifar10-32")
    assert ours.num_parameters() == 35_746_307 and ours.config == UNetConfig(dropout=0.0)
    compare_with_diffusers(theirs, ours, 32)


# -- convert and its command -------------------------------------------------------------------------------
def run_cli(argv, monkeypatch):
    """`ddim-fast ...` through the real dispatcher (other sub-commands left out: they may not exist yet)."""
    monkeypatch.setattr(cli, "COMMANDS", {"convert": cli.COMMANDS["convert"]})
    return cli.main(argv)


def test_convert_official_keeps_raw_and_ema(official, tmp_path, monkeypatch, capsys):
    path, raw, ema = official
    dst = tmp_path / "converted"
    assert run_cli(["convert", str(path), str(dst)], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "loaded official checkpoint" in out and "raw + EMA weights" in out and f"wrote {dst}" in out
    assert "0.7M parameters" in out
    assert same_weights(dd.load_model(dst).state_dict(), ema)
    assert same_weights(dd.load_model(dst, ema=False).state_dict(), raw)
    source = json.loads((dst / "config.json").read_text())["source"]
    assert source["format"] == "official" and source["step"] == 1234

    assert run_cli(["convert", str(path), str(dst)], monkeypatch) == 2
    assert "already exists; pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err
    assert run_cli(["convert", str(path), str(dst), "--overwrite", "--no-ema"], monkeypatch) == 0
    assert "one set of weights" in capsys.readouterr().out
    assert not (dst / "ema.safetensors").exists()
    assert same_weights(dd.load_model(dst).state_dict(), raw)


def test_convert_official_with_yaml_via_parser(official, tmp_path):
    path = official[0]
    yml = tmp_path / "c.yml"
    yml.write_text("data: {image_size: 16}\nmodel: {in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 2], "
                   "num_res_blocks: 1, attn_resolutions: [8], dropout: 0.0}\n"
                   "diffusion: {beta_schedule: linear, beta_start: 0.0001, beta_end: 0.02, "
                   "num_diffusion_timesteps: 1000}\n")
    parser = argparse.ArgumentParser()
    Convert.add_arguments(parser)
    args = parser.parse_args([str(path), str(tmp_path / "out"), "--config", str(yml)])
    assert Convert.run(args) == 0
    assert dd.load_model(tmp_path / "out").config == OFFICIAL_CFG


def test_convert_diffusers(small_diffusers, tmp_path):
    theirs, folder = small_diffusers
    summary = ck.convert(folder, tmp_path / "out")
    assert summary["format"] == "diffusers" and summary["ema"] is False
    back = dd.load_model(tmp_path / "out")
    assert same_weights(back.state_dict(), cv.load_diffusers(folder).state_dict())
    with pytest.raises(ValueError, match="already a ddim-fast checkpoint"):
        ck.convert(tmp_path / "out", tmp_path / "again")
    with pytest.raises(ValueError, match="config= applies to official checkpoints only"):
        ck.convert(folder, tmp_path / "x", config="c.yml")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ck.convert(tmp_path / "missing.pth", tmp_path / "y")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


# -- a pipeline folder's scheduler settings; diffusers' default UNet2DModel -------------------------------
PIPELINE_CASES = [  # DDIMScheduler settings (linear 1e-4..0.02, T=1000) and DDIMPipeline's eta
    (dict(set_alpha_to_one=False, clip_sample=False), 0.0),  # ends on alpha_bar[0], no clip: not the paper's default
    (dict(set_alpha_to_one=False, clip_sample=True, timestep_spacing="trailing"), 0.0),
    (dict(steps_offset=1, clip_sample=True, clip_sample_range=0.5), 0.0),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5, set_alpha_to_one=False), 0.0),
    (dict(set_alpha_to_one=False, timestep_spacing="linspace", clip_sample=False), 0.0),
    (dict(set_alpha_to_one=False), 0.5),  # DDIMScheduler's default clip_sample=True, with noise
]


@pytest.fixture(scope="module")
def pipeline_unet():
    return make_diffusers({**SMALL_CONFIG, "sample_size": 16}, seed=4)


def _ddim_loop(unet, scheduler, x, steps, eta, noise):
    """DDIMPipeline's loop (x_T given, per-step noise given), in the dtype of x and the UNet."""
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        extra = {} if noise is None else {"variance_noise": noise[i].to(x.dtype)}
        x = scheduler.step(unet(x, t).sample, t, x, eta=eta, **extra).prev_sample
    return x


@pytest.mark.parametrize("sched_kw, eta", PIPELINE_CASES)
def test_a_pipeline_folder_samples_like_ddim_pipeline(pipeline_unet, sched_kw, eta, tmp_path):
    """DDIM-10 of a pipeline folder (SamplingPlan.for_model) against DDIMPipeline, under docs/DESIGN.md's
    tolerance rule: diffusers' own loop in float64 is the truth, its float32 run the reference."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(**sched_kw)
    pipe = diffusers.DDIMPipeline(unet=pipeline_unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    with torch.no_grad():
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=eta,
                      output_type="pt").images  # (2, 3, 16, 16) in [0, 1]
        # DDIMPipeline's draws: x_T first, then (eta > 0) one tensor per step, from the one generator
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn(2, 3, 16, 16, generator=g)
        noise = torch.stack([torch.randn(2, 3, 16, 16, generator=g) for _ in range(10)]) if eta else None
        theirs = _ddim_loop(pipeline_unet, scheduler, x_T, 10, eta, noise)
        truth = _ddim_loop(copy.deepcopy(pipeline_unet).double(), scheduler, x_T.double(), 10, eta, noise)
    assert torch.equal((theirs / 2 + 0.5).clamp(0, 1), images)  # the loop above is the pipeline's
    model = dd.load_model(tmp_path / "pipe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # linspace: the step targets differ (tested below)
        plan = dd.SamplingPlan.for_model(model, 10, eta=eta)
    ours = dd.sample(model, x_T, plan, noise=noise)
    if sched_kw.get("timestep_spacing") == "linspace":  # diffusers steps to t - T//S; we step along the list
        assert (ours - theirs).abs().max() > 0.1
        return
    assert_close_to_reference(ours, theirs, truth, torch.float32, f"{sched_kw} eta={eta}")
    # the settings travel into a converted checkpoint
    ck.convert(tmp_path / "pipe", tmp_path / "ours")
    again = dd.load_model(tmp_path / "ours")
    assert again.sampler_defaults == model.sampler_defaults
    torch.testing.assert_close(dd.SamplingPlan.for_model(again, 10, eta=eta).coef, plan.coef, rtol=0, atol=0)


def test_the_paper_default_plan_is_not_the_pipelines(pipeline_unet):
    """The paper's default plan (final alpha 1, no clip) is far from DDIMPipeline with
    set_alpha_to_one=False: the tolerance rule above tells the two apart."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(set_alpha_to_one=False, clip_sample=False)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = _ddim_loop(pipeline_unet, scheduler, x_T, 10, 0.0, None)
        truth = _ddim_loop(copy.deepcopy(pipeline_unet).double(), scheduler, x_T.double(), 10, 0.0, None)
    ref_err = (theirs - truth).abs().max().item()
    unet = UNet(cv.diffusers_config(dict(pipeline_unet.config)))
    unet.load_state_dict(cv.from_diffusers_state_dict(unet.config, pipeline_unet.state_dict()))
    paper = dd.sample(unet.eval(), x_T, dd.SamplingPlan.build(NoiseSchedule.linear(), 10))
    assert (paper - truth).abs().max().item() > 100 * (2 * ref_err + 1e-5)


def test_sampler_defaults_read_from_a_scheduler_config():
    s = NoiseSchedule.linear(1000, 1e-4, 0.02)
    assert cv.diffusers_sampler({}, s) == {"spacing": "leading", "steps_offset": 0, "clip_x0": 1.0,
                                           "final_alpha": None}
    got = cv.diffusers_sampler({"set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "trailing",
                                "steps_offset": 1}, s)
    assert got == {"spacing": "trailing", "steps_offset": 0, "clip_x0": None,
                   "final_alpha": s.alphas_cumprod[0].item()}
    thr = cv.diffusers_sampler({"thresholding": True, "sample_max_value": 2.0}, s)
    assert thr["threshold"] == 0.995 and thr["threshold_max"] == 2.0 and thr["clip_x0"] is None
    with pytest.raises(ValueError, match="unknown diffusers timestep_spacing 'cubic'"):
        cv.diffusers_sampler({"timestep_spacing": "cubic"}, s)


def test_overrides_and_the_diffusers_step_rule():
    m = UNet(OFFICIAL_CFG)
    m.schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)
    m.sampler_defaults = {"from": "diffusers", "spacing": "leading", "steps_offset": 1, "clip_x0": 1.0,
                          "final_alpha": None}
    plan = dd.SamplingPlan.for_model(m, 10)
    assert plan.timesteps.tolist() == list(range(901, 0, -100)) and plan.clip_x0 == (-1.0, 1.0)
    over = dd.SamplingPlan.for_model(m, 10, spacing="trailing", clip_x0=None)  # offset dropped with leading
    assert over.timesteps[0] == 999 and over.clip_x0 is None
    assert dd.SamplingPlan.for_model(m, 10, threshold=0.9).threshold == 0.9  # the default clip gives way
    with pytest.warns(UserWarning, match="DDIMScheduler would differ from this plan"):
        dd.SamplingPlan.for_model(m, 10, spacing="linspace")
    with pytest.warns(UserWarning, match="DDIMScheduler would differ"):
        dd.SamplingPlan.for_model(m, 7, spacing="trailing")  # 999 -> 856 here, 999 -> 857 in diffusers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dd.SamplingPlan.for_model(m, 7)  # leading: 853 -> 711 -> ... -> 1 -> the end in both
    m.sampler_defaults = {"spacing": "leading", "clip": 1}
    with pytest.raises(ValueError, match=r"unknown sampler default\(s\) \['clip'\]"):
        dd.SamplingPlan.for_model(m, 10)


def test_diffusers_default_unet_is_refused_with_every_reason_at_once():
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(diffusers.UNet2DModel.load_config if False else diffusers.UNet2DModel(
        block_out_channels=(32, 64, 64, 64), norm_num_groups=8).config)
    with pytest.raises(ValueError) as err:
        cv.diffusers_config(cfg)
    msg = str(err.value)
    for name in ("flip_sin_to_cos=True", "freq_shift=0", "downsample_padding=1", "attention_head_dim=8",
                 "sample_size=None"):
        assert name in msg, (name, msg)
    assert "differs from the DDPM UNet in 5 setting(s)" in msg


def test_convert_without_config_says_the_image_size_is_a_guess(tmp_path, monkeypatch, capsys):
    """Attention at the first level of an 8x8 model: the DDPM convention (attention at 16x16) guesses 16."""
    cfg = UNetConfig(resolution=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    path = write_official(tmp_path / "ckpt.pth", random_weights(cfg, 6).state_dict(), None)
    with pytest.warns(UserWarning, match=r"do not determine the image size; guessed 16x16 from the DDPM convention"):
        assert cv.load_official(path, ema=False).config.resolution == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cv.load_official(path, ema=False, resolution=8).config
    assert dataclasses.replace(got, dropout=0.0) == cfg  # dropout: not in the weights, and off in eval mode
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # over this module's filter; the CLI prints warnings itself
        assert run_cli(["convert", str(path), str(tmp_path / "guessed")], monkeypatch) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddim-fast convert: warning: ") and "--resolution N" in err
    assert json.loads((tmp_path / "guessed" / "config.json").read_text())["source"]["resolution"] == "guessed"
    assert run_cli(["convert", str(path), str(tmp_path / "given"), "--resolution", "8"], monkeypatch) == 0
    assert "warning" not in capsys.readouterr().err
    assert dataclasses.replace(dd.load_model(tmp_path / "given").config, dropout=0.0) == cfg
    assert run_cli(["convert", str(path), str(tmp_path / "both"), "--resolution", "8", "--config", "c.yml"],
                   monkeypatch) == 2
    assert "not both" in capsys.readouterr().err


# -- a diffusers folder that does not convert: loaded as it is ---------------------------------------------
# diffusers' defaults: flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, attention_head_dim=8, four
# settings with no exact equivalent in this project's UNet. Tiny: widths 16/32, 8x8 samples.
AS_IS_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, attention_head_dim=8)
AS_IS_SETTINGS = ("flip_sin_to_cos=True", "freq_shift=0", "downsample_padding=1", "attention_head_dim=8")
AS_IS_STEPS = 10  # divides T: DDIMScheduler's t - T // S is the plan's next timestep


@pytest.fixture(scope="module")
def as_is_pipeline(tmp_path_factory):
    """DDIMPipeline(unet, DDIMScheduler(...)).save_pretrained(folder): what a diffusers user has. The scheduler
    ends on alpha_bar[0] and clips x0 (its defaults but set_alpha_to_one), so the folder brings settings."""
    diffusers = pytest.importorskip("diffusers")
    m = make_diffusers(AS_IS_UNET, seed=5)
    pipe = diffusers.DDIMPipeline(unet=m, scheduler=diffusers.DDIMScheduler(set_alpha_to_one=False))
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("as-is") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


def test_a_diffusers_folder_that_does_not_convert_loads_as_it_is(as_is_pipeline):
    pipe, folder = as_is_pipeline
    for path in (folder, folder / "unet"):
        m = dd.load_model(path)
        assert type(m).__name__ == "UNet2DModel" and not m.training
        info = m.checkpoint_info
        assert info["as_is"] == "UNet2DModel" and all(s in info["why"] for s in AS_IS_SETTINGS)
        assert same_weights(m.state_dict(), pipe.unet.state_dict())
        # the scheduler's settings, read exactly as the converting path reads them
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        schedule, prediction = cv.diffusers_schedule(cfg)
        assert m.schedule.spec == schedule.spec and m.prediction == prediction == "eps"
        assert m.sampler_defaults == {"from": "diffusers", **cv.diffusers_sampler(cfg, schedule)}
        assert m.sampler_defaults["clip_x0"] == 1.0 and m.sampler_defaults["final_alpha"] == schedule.alphas_cumprod[0]
    with pytest.raises(ValueError, match="does not convert into ddim-fast's UNet: its settings .*flip_sin_to_cos=True"
                                         r".*Use the folder as it is instead \(dd.load_model"):
        ck.convert(folder, folder.parent / "converted")
    assert not (folder.parent / "converted").exists()


def _ddim_pipeline_loop(unet, scheduler, x, steps):
    """DDIMPipeline's loop from x_T (eta 0), in the dtype of x and the UNet."""
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


def test_for_model_of_a_pipeline_folder_or_scheduler_is_ddim_pipeline(as_is_pipeline):
    """SamplingPlan.for_model of the pipeline, its folder, its scheduler (object, config dict, folder, file) or
    the loaded model is one plan, and DDIM-S with it is DDIMPipeline's DDIM-S: the float64 reference equals
    diffusers' loop in float64 to 1e-9 relative (as tests/models/test_diffusers_cfg.py checks the CFG loop), and
    float32 meets the tolerance rule against it, with diffusers' float32 run as the reference."""
    import numpy as np

    pipe, folder = as_is_pipeline
    model = dd.load_model(folder)
    plan = dd.SamplingPlan.for_model(model, AS_IS_STEPS)
    assert plan.clip_x0 == (-1.0, 1.0) and plan.final_alpha == model.schedule.alphas_cumprod[0].item()
    sched_dir = folder / "scheduler"
    for source in (pipe, folder, str(folder), sched_dir, sched_dir / "scheduler_config.json", pipe.scheduler,
                   dict(pipe.scheduler.config)):
        other = dd.SamplingPlan.for_model(source, AS_IS_STEPS)
        assert torch.equal(other.timesteps, plan.timesteps) and torch.equal(other.coef, plan.coef), source
        assert other.describe() == plan.describe()
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=AS_IS_STEPS,
                  output_type="np").images  # (2, 8, 8, 3) in [0, 1]
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the pipeline's draw
    theirs = _ddim_pipeline_loop(pipe.unet, copy.deepcopy(pipe.scheduler), x_T, AS_IS_STEPS)
    assert np.array_equal((theirs / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), images)  # the pipeline's loop
    exact = copy.deepcopy(pipe.scheduler)  # diffusers keeps float32 tables: the float64 truth needs the exact ones
    exact.alphas_cumprod = model.schedule.alphas_cumprod.clone()
    exact.final_alpha_cumprod = model.schedule.alphas_cumprod[0].clone()
    truth = _ddim_pipeline_loop(copy.deepcopy(pipe.unet).double(), exact, x_T.double(), AS_IS_STEPS)
    ours64 = dd.sample(copy.deepcopy(model).double(), x_T.double(), plan)
    assert ours64.dtype == torch.float64 and relative_error(ours64, truth) <= 1e-9
    ours = dd.sample(model, x_T, plan)
    assert_close_to_reference(ours, theirs, truth, torch.float32, "an as-is UNet2DModel folder, DDIM-10")
    plain = dd.sample(pipe.unet, x_T, dd.SamplingPlan.for_model(pipe, AS_IS_STEPS))  # the pipeline's own UNet
    assert torch.equal(plain, ours)
    paper = dd.sample(model, x_T, dd.SamplingPlan.build(model.schedule, AS_IS_STEPS))  # without the folder's settings
    assert (paper - truth).abs().max() > 100 * (theirs - truth).abs().max() + 1e-3


def test_the_command_line_samples_an_as_is_folder(as_is_pipeline, tmp_path, monkeypatch, capsys):
    import numpy as np

    _, folder = as_is_pipeline
    common = ["--model", str(folder), "--backend", "reference", "--steps", "4", "--no-progress"]
    assert cli.main(["sample", *common, "--num", "2", "--out", str(tmp_path / "x.npz")]) == 0
    out = capsys.readouterr().out
    assert (f"loaded {folder} as a diffusers UNet2DModel: its settings (flip_sin_to_cos=True, freq_shift=0, "
            "downsample_padding=1, attention_head_dim=8) have no exact equivalent in ddim-fast's UNet; the fused "
            "GroupNorm/attention kernels do not apply") in out
    model = dd.load_model(folder)
    want = dd.Engine(model, dd.SamplingPlan.for_model(model, 4), backend="reference", device="cpu").sample(2, seed=0)
    got = np.load(tmp_path / "x.npz")
    np.testing.assert_allclose(got["images"], want.numpy(), rtol=0, atol=1e-6)
    assert json.loads(str(got["meta"]))["config"]["flip_sin_to_cos"] is True  # a diffusers config, recorded
    assert cli.main(["encode", *common, "--input", str(tmp_path / "x.npz"), "--out", str(tmp_path / "z.npz")]) == 0
    assert np.load(tmp_path / "z.npz")["latents"].shape == (2, 3, 8, 8)
    from ddim_fast.sample_grid import write_sample_grid  # eval-digits' and the trainer's grids: shape from the model

    write_sample_grid(tmp_path / "grid.png", model, n=4, steps=2)
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (2 * 9 + 1, 2 * 9 + 1)  # 2 x 2 images of 8 x 8, 1 px apart


def test_the_command_line_says_a_diffusers_folder_was_converted(small_diffusers, tmp_path, capsys):
    _, folder = small_diffusers
    assert cli.main(["sample", "--model", str(folder), "--backend", "reference", "--steps", "2", "--num", "1",
                     "--no-progress", "--out", str(tmp_path / "x.npz")]) == 0
    assert (f"loaded {folder}: a diffusers UNet2DModel that is the DDPM UNet, converted exactly into ddim-fast's "
            "UNet (the fused GroupNorm/attention kernels apply)") in capsys.readouterr().out


def test_an_as_is_folder_without_diffusers_names_the_extra(as_is_pipeline, tmp_path, monkeypatch, capsys):
    import sys

    from ddim_fast.checks import MissingExtra

    _, folder = as_is_pipeline
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"UNet2DModel that ddim-fast loads as it is .* needs diffusers, which "
                                           r"is not installed: pip install 'ddim-fast\[diffusers\]'"):
        dd.load_model(folder)
    assert cli.main(["sample", "--model", str(folder), "--no-progress", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'ddim-fast[diffusers]'" in err


def test_a_unet2dconditionmodel_folder_loads_as_it_is(tmp_path, capsys):
    text = text_unet()
    text.save_pretrained(tmp_path / "unet")
    m = dd.load_model(tmp_path / "unet")
    assert type(m).__name__ == "UNet2DConditionModel" and same_weights(m.state_dict(), text.state_dict())
    assert m.checkpoint_info["why"] == "a UNet2DConditionModel has no equivalent in ddim-fast's UNet"
    plan = dd.SamplingPlan.for_model(m, 2)  # no scheduler config: the DDPM schedule, eps, no sampler settings
    assert m.sampler_defaults is None and plan.timesteps.tolist() == [500, 0]
    h = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    x = dd.sample(m, torch.randn(1, 4, 8, 8), plan, cond={"encoder_hidden_states": h})
    assert x.shape == (1, 4, 8, 8) and torch.isfinite(x).all()
    # the command line cannot give encoder_hidden_states: one line, before the weights load
    assert cli.main(["sample", "--model", str(tmp_path / "unet"), "--no-progress", "--out",
                     str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs encoder_hidden_states (a text-conditioned UNet)" in err


def test_for_model_says_what_it_takes(as_is_pipeline, tmp_path):
    _, folder = as_is_pipeline
    with pytest.raises(ValueError, match="holds no diffusers scheduler config .* load the model with dd.load_model"):
        dd.SamplingPlan.for_model(folder / "unet", 10)
    with pytest.raises(ValueError, match="is the config of a UNet2DModel, not of a scheduler"):
        dd.SamplingPlan.for_model(folder / "unet" / "config.json", 10)
    with pytest.raises(FileNotFoundError, match="no folder or file at"):
        dd.SamplingPlan.for_model(tmp_path / "nothing", 10)
    with pytest.raises(ValueError, match="carries no noise schedule .* a diffusers pipeline, its scheduler or its "
                                         "folder"):
        dd.SamplingPlan.for_model(as_is_pipeline[0].unet, 10)
    with pytest.raises(ValueError, match="the scheduler config's num_train_timesteps must be a number, got '1000'"):
        dd.SamplingPlan.for_model({"num_train_timesteps": "1000"}, 10)
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive int, got 10.5"):
        dd.SamplingPlan.for_model({"num_train_timesteps": 10.5}, 10)
