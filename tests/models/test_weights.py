"""models/weights.py: checking a state dict against a config, and reading the architecture back
from the weights' shapes (presets, unknown configs, class-conditional weights)."""

import pytest
import torch

from ddim_fast.models.unet import PRESETS, UNet, UNetConfig
from ddim_fast.models.weights import check_state_dict, describe_weights, infer_config

COND = UNetConfig(**{**UNetConfig.tiny().to_dict(), "num_classes": 5})


def meta_unet(config: UNetConfig) -> UNet:
    with torch.device("meta"):
        return UNet(config)


# -- reading an architecture from weights --------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_infer_config_finds_the_preset(name):
    cfg = UNetConfig.preset(name)
    assert infer_config(meta_unet(cfg).state_dict()) == cfg


def test_infer_config_without_a_preset():
    cfg = UNetConfig(resolution=64, ch=64, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(16,))
    sd = meta_unet(cfg).state_dict()
    got = infer_config(sd)
    assert got == cfg  # attention anchored at 16x16 gives resolution 64
    assert "ch=64, ch_mult=(1, 2, 4), num_res_blocks=1, attention at level(s) [2]" in describe_weights(sd)
    no_attn = meta_unet(UNetConfig(resolution=16, ch=32, ch_mult=(1, 2), attn_resolutions=())).state_dict()
    with pytest.raises(ValueError, match="cannot tell the resolution"):
        infer_config(no_attn)
    assert infer_config(no_attn, resolution=16).attn_resolutions == ()
    with pytest.raises(ValueError, match="not a DDPM UNet in the official key layout"):
        infer_config({"foo.weight": torch.zeros(1)})


def test_infer_config_and_describe_conditional_weights():
    sd = meta_unet(COND).state_dict()
    assert infer_config(sd) == COND
    assert describe_weights(sd).endswith("num_classes=5: that is UNetConfig.tiny() with num_classes=5")
    digits10 = UNetConfig(**{**UNetConfig.digits().to_dict(), "num_classes": 10})
    assert infer_config(meta_unet(digits10).state_dict()) == digits10
    other = UNetConfig(resolution=64, ch=64, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                       num_classes=3)
    assert infer_config(meta_unet(other).state_dict()) == other
    with pytest.raises(ValueError, match="label_emb.weight has 1 row"):
        infer_config({**sd, "label_emb.weight": torch.zeros(1, 128)})


def test_check_state_dict_lists_every_kind_of_mismatch():
    sd = UNet(UNetConfig.tiny()).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["conv_out.bias"]
    sd["conv_in.weight"] = torch.zeros(32, 1, 3, 3)
    with pytest.raises(ValueError) as e:
        check_state_dict(UNetConfig.tiny(), sd)
    msg = str(e.value)
    assert "missing (1): conv_out.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "mis-shaped (1): conv_in.weight (32, 1, 3, 3) vs model (32, 3, 3, 3)" in msg
    assert "in_channels=1" in msg  # the description reads the weights' own shapes
