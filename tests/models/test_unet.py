"""The DDPM UNet: configs, presets, shapes, the ops seam, and the network against an independent
re-statement of the official DDIM code's forward pass."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddim_fast.models.ops import ReferenceOps
from ddim_fast.models.unet import (
    PRESETS,
    AttnBlock,
    ResnetBlock,
    UNet,
    UNetConfig,
    timestep_embedding,
)
from tests.helpers import assert_close_to_reference


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Move every parameter away from its init (GroupNorm weights 1 and biases 0 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * scale)
            else:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def meta_unet(config: UNetConfig) -> UNet:
    with torch.device("meta"):
        return UNet(config)


# -- an independent statement of the official forward pass (models/diffusion.py `Model`) ------------
def _swish(x):
    return x * torch.sigmoid(x)


def _official_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    arg = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def _official_res(b: ResnetBlock, x, temb):
    h = b.conv1(_swish(b.norm1(x)))  # nn.GroupNorm's own forward, separate add, separate swish
    h = h + b.temb_proj(_swish(temb))[:, :, None, None]
    h = b.conv2(b.dropout(_swish(b.norm2(h))))
    if hasattr(b, "nin_shortcut"):
        x = b.nin_shortcut(x)
    return x + h


def _official_attn(a: AttnBlock, x):
    B, C, H, W = x.shape
    h = a.norm(x)
    q = a.q(h).reshape(B, C, H * W).permute(0, 2, 1)  # (B, N, C)
    k = a.k(h).reshape(B, C, H * W)
    w = torch.softmax(torch.bmm(q, k) * C**-0.5, dim=2)  # (B, Nq, Nk)
    v = a.v(h).reshape(B, C, H * W)
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)
    return x + a.proj_out(out)


def official_forward(m: UNet, x, t):
    cfg = m.config
    L = len(cfg.ch_mult)
    temb = m.temb.dense[1](_swish(m.temb.dense[0](_official_embedding(t, cfg.ch))))
    hs = [m.conv_in(x)]
    for i in range(L):
        for j in range(cfg.num_res_blocks):
            h = _official_res(m.down[i].block[j], hs[-1], temb)
            if len(m.down[i].attn):
                h = _official_attn(m.down[i].attn[j], h)
            hs.append(h)
        if i != L - 1:
            if cfg.resamp_with_conv:
                conv = m.down[i].downsample.conv
                hs.append(F.conv2d(F.pad(hs[-1], (0, 1, 0, 1)), conv.weight, conv.bias, stride=2))
            else:
                hs.append(F.avg_pool2d(hs[-1], kernel_size=2, stride=2))
    h = _official_res(m.mid.block_1, hs[-1], temb)
    h = _official_attn(m.mid.attn_1, h)
    h = _official_res(m.mid.block_2, h, temb)
    for i in reversed(range(L)):
        for j in range(cfg.num_res_blocks + 1):
            h = _official_res(m.up[i].block[j], torch.cat([h, hs.pop()], dim=1), temb)
            if len(m.up[i].attn):
                h = _official_attn(m.up[i].attn[j], h)
        if i != 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            if cfg.resamp_with_conv:
                h = m.up[i].upsample.conv(h)
    return m.conv_out(_swish(m.norm_out(h)))


# -- configs and presets ------------------------------------------------------------------------------
# Exact counts, computed once from the architecture; the paper's table rounds them to 35.7M, 78.7M and
# 113.6M/113.7M.
PARAM_COUNTS = {"cifar10": 35_746_307, "celeba": 78_700_803, "lsun": 113_673_219, "tiny": 702_499}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_preset_parameter_counts(name):
    assert meta_unet(UNetConfig.preset(name)).num_parameters() == PARAM_COUNTS[name]


def test_cifar10_matches_the_paper():
    cfg = UNetConfig.cifar10()
    assert round(PARAM_COUNTS["cifar10"] / 1e6, 1) == 35.7
    assert (cfg.resolution, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions, cfg.dropout) == (
        32, 128, (1, 2, 2, 2), 2, (16,), 0.1)
    assert round(PARAM_COUNTS["celeba"] / 1e6, 1) == 78.7
    assert UNetConfig.lsun().ch_mult == (1, 1, 2, 2, 4, 4) and UNetConfig.lsun().dropout == 0.0
    assert UNetConfig.celeba().resolution == 64 and UNetConfig.lsun().resolution == 256


def test_tiny_and_digits_presets_exercise_every_op():
    for cfg in (UNetConfig.tiny(), UNetConfig.digits()):
        assert cfg.resolution == 16
        assert len(cfg.ch_mult) >= 2 and cfg.attn_resolutions and cfg.resamp_with_conv
        assert len(set(cfg.ch_mult)) >= 2  # a channel change: nin_shortcut on the way down too
    n = meta_unet(UNetConfig.tiny()).num_parameters()
    assert 100_000 <= n < 1_000_000
    d = UNetConfig.digits()
    assert d.in_channels == d.out_channels == 1


def test_config_round_trips_through_json():
    for name in PRESETS:
        cfg = UNetConfig.preset(name)
        d = json.loads(json.dumps(cfg.to_dict()))
        assert UNetConfig.from_dict(d) == cfg
    cfg = UNetConfig.from_dict({"ch_mult": [1, 2], "attn_resolutions": [16], "resolution": 32})
    assert cfg.ch_mult == (1, 2) and cfg.attn_resolutions == (16,)
    assert hash(cfg) == hash(UNetConfig(ch_mult=(1, 2), attn_resolutions=(16,), resolution=32))


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown UNetConfig key\(s\) \['chanels'\].*known keys"):
        UNetConfig.from_dict({**UNetConfig().to_dict(), "chanels": 3})


@pytest.mark.parametrize("kwargs, message", [
    ({"ch_mult": ()}, "ch_mult must be a non-empty"),
    ({"ch_mult": (1, 0)}, "ch_mult entry must be a positive int"),
    ({"attn_resolutions": (12,)}, r"attention resolution 12 matches no level; the levels have sizes \(32, 16, 8, 4\)"),
    ({"resolution": 36}, "cannot be halved 3 times"),
    ({"ch": 48}, "not divisible by num_groups=32"),
    ({"ch": 7}, "ch must be even"),
    ({"dropout": 1.0}, r"dropout must be a float in \[0, 1\)"),
    ({"in_channels": 0}, "in_channels must be a positive int"),
    ({"num_res_blocks": 2.0}, "num_res_blocks must be a positive int"),
    ({"resamp_with_conv": 1}, "resamp_with_conv must be True or False"),
    ({"norm_eps": 0}, "norm_eps must be a positive float"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_preset_by_name():
    assert UNetConfig.preset("celeba") == UNetConfig.celeba()
    with pytest.raises(ValueError, match="unknown UNet preset 'cifar'; expected one of"):
        UNetConfig.preset("cifar")


def test_official_key_names():
    keys = set(meta_unet(UNetConfig.cifar10()).state_dict())
    for k in ("conv_in.weight", "temb.dense.0.weight", "temb.dense.1.bias", "down.0.block.0.conv1.weight",
              "down.1.attn.1.q.weight", "down.1.block.0.nin_shortcut.weight", "down.2.downsample.conv.weight",
              "mid.block_1.temb_proj.weight", "mid.attn_1.proj_out.weight", "mid.block_2.norm2.bias",
              "up.3.block.2.nin_shortcut.weight", "up.1.attn.2.k.bias", "up.1.upsample.conv.weight",
              "norm_out.weight", "conv_out.bias"):
        assert k in keys, k
    assert not any(k.startswith("down.3.downsample") or k.startswith("up.0.upsample") for k in keys)
    assert not any(".attn." in k for k in keys if k.startswith(("down.0.", "down.2.", "up.0.", "up.3.")))


# -- forward --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize(UNet(UNetConfig.tiny()), seed=1).eval()


def test_forward_shape_and_timestep_forms(tiny):
    x = torch.randn(3, 3, 8, 8)  # any multiple of 2 works; 8x8 keeps the test cheap
    with torch.no_grad():
        ref = tiny(x, torch.full((3,), 250, dtype=torch.long))
        assert ref.shape == (3, 3, 8, 8) and ref.dtype == torch.float32
        for t in (250, torch.tensor(250), torch.tensor([250]), torch.full((3,), 250.0)):
            assert torch.equal(tiny(x, t), ref)
        mixed = tiny(x, torch.tensor([0, 250, 999]))
    torch.testing.assert_close(mixed[1], ref[1], rtol=0, atol=1e-5)  # per-sample t, batch-invariant
    assert not torch.allclose(mixed[0], ref[0], atol=1e-3)  # t really conditions the output


def test_forward_digits_shape():
    m = UNet(UNetConfig.digits()).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 16, 16), torch.tensor([3, 7])).shape == (2, 1, 16, 16)


def test_forward_rejects_bad_inputs(tiny):
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        tiny(torch.randn(2, 1, 16, 16), 0)
    with pytest.raises(ValueError, match="multiples of 2"):
        tiny(torch.randn(2, 3, 15, 16), 0)
    with pytest.raises(ValueError, match="t must be a scalar or a \\(B,\\) tensor.*B = 2"):
        tiny(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("config", [
    UNetConfig.tiny(),
    UNetConfig(resolution=16, ch=32, ch_mult=(1, 2, 1), num_res_blocks=2, attn_resolutions=(16, 4),
               dropout=0.0, resamp_with_conv=False),
], ids=["tiny", "no-resample-conv"])
def test_matches_the_official_forward(config):
    torch.manual_seed(0)
    m = randomize(UNet(config), seed=2).eval()
    x = torch.randn(2, 3, 16, 16) if config == UNetConfig.tiny() else torch.randn(2, 3, 8, 8)
    t = torch.tensor([7, 901])
    with torch.no_grad():
        ours, theirs = m(x, t), official_forward(m, x, t)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 17, 999])
    e = timestep_embedding(t, 64)  # (4, 64)
    i = torch.arange(32, dtype=torch.float64)
    arg = t.double()[:, None] * torch.exp(-math.log(10000) * i / 31)[None, :]
    torch.testing.assert_close(e[:, :32].double(), torch.sin(arg), rtol=0, atol=2e-4)
    torch.testing.assert_close(e[:, 32:].double(), torch.cos(arg), rtol=0, atol=2e-4)
    assert torch.equal(e[0], torch.cat([torch.zeros(32), torch.ones(32)]))


def test_downsample_pads_bottom_right_only():
    m = UNet(UNetConfig.tiny())
    ds = m.down[0].downsample
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        y = ds(x)
        # Output pixel (0, 0) sees input rows/cols 0..2 (no padding at the top/left).
        manual = (ds.conv.weight[:, :, :, :] * x[:, None, :, 0:3, 0:3]).sum((2, 3, 4)) + ds.conv.bias
    assert y.shape == (1, 32, 4, 4)
    torch.testing.assert_close(y[:, :, 0, 0], manual, rtol=1e-5, atol=1e-5)


# -- the ops seam ------------------------------------------------------------------------------------------
class ManualOps:
    """GroupNorm and attention written out by hand, recording what the network passes in."""

    name = "manual"

    def __init__(self):
        self.norm_weights, self.adds, self.attention_calls = [], 0, 0

    def group_norm(self, x, weight, bias, num_groups, eps, *, add=None, silu=False):
        self.norm_weights.append(weight)
        if add is not None:
            self.adds += 1
            x = x + add[:, :, None, None]
        B, C, H, W = x.shape
        g = x.reshape(B, num_groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = ((g - mean) ** 2).mean(-1, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + eps)).reshape(B, C, H, W)
        y = y * weight[None, :, None, None] + bias[None, :, None, None]
        return y * torch.sigmoid(y) if silu else y

    def attention(self, q, k, v):
        self.attention_calls += 1
        s = torch.einsum("bci,bcj->bij", q, k) / math.sqrt(q.shape[1])  # (B, Nq, Nk)
        p = torch.exp(s - s.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        return torch.einsum("bij,bcj->bci", p, v)  # (B, C, Nq)


def _forbid(*_args, **_kwargs):
    raise AssertionError("the network called a norm/attention primitive outside its ops object")


def test_every_norm_and_attention_goes_through_ops(tiny, monkeypatch):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 600])
    with torch.no_grad():
        ref = tiny(x, t)
    ops = ManualOps()
    tiny.set_ops(ops)
    try:
        for name in ("group_norm", "softmax", "scaled_dot_product_attention", "layer_norm"):
            monkeypatch.setattr(F, name, _forbid)
        monkeypatch.setattr(torch, "softmax", _forbid)
        monkeypatch.setattr(nn.GroupNorm, "forward", _forbid)
        with torch.no_grad():
            out = tiny(x, t)
    finally:
        monkeypatch.undo()
        tiny.set_ops("reference")
    norms = [m for m in tiny.modules() if isinstance(m, nn.GroupNorm)]
    assert sorted(map(id, ops.norm_weights)) == sorted(id(m.weight) for m in norms)  # each one, once
    assert ops.adds == sum(isinstance(m, ResnetBlock) for m in tiny.modules())
    assert ops.attention_calls == sum(isinstance(m, AttnBlock) for m in tiny.modules()) == 4
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_set_ops(tiny):
    assert tiny.set_ops("reference") is tiny
    assert isinstance(tiny.ops, ReferenceOps)
    assert all(isinstance(m.ops, ReferenceOps) for m in tiny.modules() if isinstance(m, (ResnetBlock, AttnBlock)))
    with pytest.raises(ValueError, match="unknown ops 'fast'"):
        tiny.set_ops("fast")
    with pytest.raises(ValueError, match="group_norm\\(\\) and attention\\(\\)"):
        tiny.set_ops(object())


def test_reference_ops_against_torch_modules():
    torch.manual_seed(0)
    gn = nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x, add = torch.randn(2, 32, 5, 7), torch.randn(2, 32)
    out = ReferenceOps.group_norm(x, gn.weight, gn.bias, 8, 1e-6, add=add, silu=True)
    torch.testing.assert_close(out, F.silu(gn(x + add[:, :, None, None])), rtol=1e-6, atol=1e-6)
    q, k, v = torch.randn(3, 2, 16, 10).unbind(0)
    torch.testing.assert_close(ReferenceOps.attention(q, k, v), ManualOps().attention(q, k, v),
                               rtol=1e-5, atol=1e-6)


# -- class conditioning -------------------------------------------------------------------------------------
COND = UNetConfig(**{**UNetConfig.tiny().to_dict(), "num_classes": 5})


@pytest.fixture(scope="module")
def cond():
    torch.manual_seed(0)
    return randomize(UNet(COND), seed=3).eval()


def test_conditional_config_and_parameters():
    d = COND.to_dict()
    assert d["num_classes"] == 5 and UNetConfig.from_dict(json.loads(json.dumps(d))) == COND
    assert "num_classes" not in UNetConfig.tiny().to_dict()  # unconditional files are unchanged
    temb_ch = 4 * COND.ch
    assert meta_unet(COND).num_parameters() == PARAM_COUNTS["tiny"] + 6 * temb_ch  # N + 1 rows (null label)
    assert tuple(meta_unet(COND).state_dict()["label_emb.weight"].shape) == (6, temb_ch)
    assert not any(k.startswith("label_emb") for k in meta_unet(UNetConfig.tiny()).state_dict())
    # registered last: the shared weights initialise exactly as the unconditional model's
    torch.manual_seed(4)
    a = UNet(UNetConfig.tiny()).state_dict()
    torch.manual_seed(4)
    b = UNet(COND).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and set(b) - set(a) == {"label_emb.weight"}
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="num_classes .*must be a positive int"):
            UNetConfig(num_classes=bad)


def test_label_embedding_is_added_after_the_time_mlp(cond):
    """The placement diffusers' UNet2DModel uses (emb = time_embedding(t) + class_embedding(y)):
    the conditional network equals the unconditional one with label_emb(y) added to the output of
    temb.dense[1], which is what makes a later importer a key rename."""
    plain = UNet(UNetConfig.tiny()).eval()
    plain.load_state_dict({k: v for k, v in cond.state_dict().items() if k != "label_emb.weight"})
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([3, 400, 999]), torch.tensor([0, 4, 5])
    hook = plain.temb.dense[1].register_forward_hook(lambda mod, inp, out: out + cond.label_emb(y))
    with torch.no_grad():
        want = plain(x, t)
        hook.remove()
        got = cond(x, t, class_labels=y)
        official = official_forward(plain, x, t)  # no labels: the time embedding alone
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - official).abs().max() > 1e-2  # the labels change the output


def test_class_label_forms(cond):
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10, 10, 10])
    with torch.no_grad():
        null = cond(x, t, class_labels=torch.full((3,), 5))
        assert torch.equal(cond(x, t), null)  # None: all-null, the unconditional branch
        three = cond(x, t, class_labels=torch.tensor([3, 3, 3]))
        for y in (3, torch.tensor(3), torch.tensor([3]), torch.tensor([3, 3, 3], dtype=torch.int32)):
            assert torch.equal(cond(x, t, class_labels=y), three)
        mixed = cond(x, t, class_labels=torch.tensor([0, 3, 5]))
    torch.testing.assert_close(mixed[1], three[1], rtol=0, atol=1e-5)  # per-sample labels, batch-invariant
    torch.testing.assert_close(mixed[2], null[2], rtol=0, atol=1e-5)
    assert not torch.allclose(mixed[0], three[0], atol=1e-3)


def test_class_labels_bad_input(cond, tiny):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    for y, match in ((torch.tensor([0, 6]), r"class_labels must be in \[0, 5\] \(labels 0..4, 5 the null label\), "
                                            "got values from 0 to 6"),
                     (torch.tensor([-1, 2]), r"must be in \[0, 5\].*from -1 to 2"),
                     (torch.tensor([1, 2, 3]), r"a scalar or a \(B,\) tensor of labels with B = 2, got shape \(3,\)"),
                     (torch.zeros(2, 1, dtype=torch.long), "B = 2, got shape \\(2, 1\\)"),
                     (torch.tensor([1.0, 2.0]), "must be an integer tensor"),
                     (torch.tensor([True, False]), "must be an integer tensor")):
        with pytest.raises(ValueError, match=match):
            cond(x, t, class_labels=y)
    with pytest.raises(ValueError, match="class_labels given to an unconditional model"):
        tiny(x, t, class_labels=torch.tensor([0, 1]))


def test_conditional_checkpoint_round_trip(cond, tmp_path):
    from ddim_fast.checkpoint import load_model, save_model
    from ddim_fast.models.weights import check_state_dict
    from ddim_fast.schedule import NoiseSchedule

    cond.schedule = NoiseSchedule.linear()
    path = save_model(tmp_path / "c", cond)
    assert json.loads((path / "config.json").read_text())["model"]["num_classes"] == 5
    back = load_model(path)
    assert back.config == COND
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 50]), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(back(x, t, class_labels=y), cond(x, t, class_labels=y))
    with pytest.raises(ValueError, match=r"unexpected \(1\): label_emb.weight(.|\n)*num_classes=5"):
        check_state_dict(UNetConfig.tiny(), cond.state_dict())
    with pytest.raises(ValueError, match=r"missing \(1\): label_emb.weight"):
        check_state_dict(COND, UNet(UNetConfig.tiny()).state_dict())


def test_conditional_forward_traces_with_torch_export(cond):
    """torch.export (under torch.onnx's dynamo exporter too) needs no data-dependent branching:
    the label range check is skipped while tracing. Labels are an input with the batch dimension."""

    class WithLabels(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, t, y):
            return self.m(x, t, class_labels=y)

    batch = torch.export.Dim("batch", min=1, max=1024)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 5])
    with torch.no_grad():
        prog = torch.export.export(WithLabels(cond), (x, t, y),
                                   dynamic_shapes={"x": {0: batch}, "t": {0: batch}, "y": {0: batch}})
        x3, t3, y3 = torch.randn(3, 3, 8, 8), torch.tensor([7, 70, 700]), torch.tensor([4, 2, 5])
        torch.testing.assert_close(prog.module()(x3, t3, y3), cond(x3, t3, class_labels=y3), rtol=0, atol=1e-5)
        null = torch.export.export(cond, (x, t))  # model(x, t) alone: the null-label branch
        torch.testing.assert_close(null.module()(x, t), cond(x, t, class_labels=torch.full((2,), 5)),
                                   rtol=0, atol=1e-5)


# -- on a GPU (tier 5; skipped without CUDA) ----------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_forward_matches_the_cpu_reference(tiny, tmp_path):
    from ddim_fast.checkpoint import load_model, save_model
    from ddim_fast.schedule import NoiseSchedule

    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        ref = tiny(x, t)  # the CPU fp32 run
        truth = UNet(tiny.config).double().eval()
        truth.load_state_dict(tiny.state_dict())
        truth = truth(x.double(), t)
    tiny.schedule = NoiseSchedule.linear()
    path = save_model(tmp_path / "ckpt", tiny)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # plain fp32 here
    try:
        m = load_model(path, device="cuda")
        assert next(m.parameters()).device.type == "cuda"
        with torch.no_grad():
            got = m(x.cuda(), t.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert_close_to_reference(got, ref, truth, torch.float32, "tiny UNet on CUDA")
