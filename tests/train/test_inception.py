"""The FID Inception-v3: layout and parameter count of the standard network, the TF pooling
quirks, safe loading of user-provided weights (random weights here: the real file cannot be
downloaded on this machine), the input convention, and FID on top of it.

The network costs ~6 GFLOP per image at 299 x 299, so every forward pass here uses N <= 4 and
the features of the two image sets are computed once per module."""

import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ddim_fast import inception as I
from ddim_fast.metrics import feature_statistics
from tests.helpers import MarkerPayload, assert_close_to_reference


def _random_weights(model: I.FIDInceptionV3, seed: int) -> I.FIDInceptionV3:
    """Scale-preserving random weights (He-normal convolutions, non-trivial BatchNorm statistics)
    so that pool3 features are O(1) and differ between images; PyTorch's default init makes
    them vanish (~1e-8) through the 94 layers."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = t[0].numel()
            t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif name.endswith(("bn.weight", "bn.running_var")):
            t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif name.startswith("fc."):
            t.copy_(torch.randn(t.shape, generator=g) * 0.01)
    return model.eval()


@pytest.fixture(scope="module")
def net():
    return _random_weights(I.FIDInceptionV3(), seed=0)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1  # (4, 3, 32, 32) in [-1, 1]
    b = (torch.rand(4, 3, 32, 32, generator=g) * 2 - 1) * 0.5 + 0.3  # another distribution
    return a, b


@pytest.fixture(scope="module")
def feats(net, images):
    return net.features(images[0]), net.features(images[1])


@pytest.fixture(scope="module")
def files(net, tmp_path_factory):
    d = tmp_path_factory.mktemp("fid_weights")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(net.state_dict(), d / I.STANDARD_WEIGHTS)  # an OrderedDict with _metadata, as real files
    save_file(state, str(d / "fid_inception.safetensors"))
    return d / I.STANDARD_WEIGHTS, d / "fid_inception.safetensors", state


# -- the architecture ------------------------------------------------------------------------------
def test_parameter_count_and_layout(net):
    # torchvision's inception_v3 has 27,161,264 parameters (its weights' num_params) with the
    # auxiliary head. That head: conv0 768*128 + BN 2*128, conv1 128*768*5*5 + BN 2*768,
    # fc 768*1000 + 1000. The FID network drops it and has a 1008-way fc: +8 * (2048 + 1).
    aux = 768 * 128 + 2 * 128 + 128 * 768 * 25 + 2 * 768 + 768 * 1000 + 1000
    assert aux == 3_326_696 and 27_161_264 - aux == 23_834_568
    want = 23_834_568 + (2048 * 1008 + 1008) - (2048 * 1000 + 1000)
    assert want == 23_850_960 == I.PARAMETER_COUNT
    assert sum(p.numel() for p in net.parameters()) == want
    assert not any(p.requires_grad for p in net.parameters())

    sd = net.state_dict()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 94  # Inception-v3 without the auxiliary head
    assert all(m.bias is None for m in convs) and all(m.eps == 0.001 for m in bns)
    assert len(sd) == 94 * 6 + 2  # conv.weight + 5 BN entries per layer, fc.weight, fc.bias
    assert tuple(sd["fc.weight"].shape) == (1008, 2048) and tuple(sd["fc.bias"].shape) == (1008,)
    assert tuple(sd["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["Mixed_5b.branch_pool.conv.weight"].shape) == (32, 192, 1, 1)
    assert tuple(sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape) == (192, 192, 1, 7)
    assert tuple(sd["Mixed_7a.branch7x7x3_4.conv.weight"].shape) == (192, 192, 3, 3)
    assert tuple(sd["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape) == (384,)
    assert not any(k.startswith("AuxLogits") for k in sd)


def _pool_branch_output(block, x):
    """The pool branch of an Inception block with its 1x1 conv set to pass channel 0 through
    (BN made the identity), so the output's last channel is the 3x3 pool of x[:, 0]."""
    conv, bn = block.branch_pool.conv, block.branch_pool.bn
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[-1, 0] = 1.0
        bn.weight.fill_(1.0), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps)
    return block.eval()(x)[:, -1]


@pytest.mark.parametrize("block", ["Mixed_5b", "Mixed_6b", "Mixed_7b"])  # FIDInceptionA, C, E_1
def test_average_pools_ignore_padding(net, block):
    # TF's average pool divides by the number of in-image values: a constant image stays
    # constant up to the border (torchvision's count_include_pad=True gives 4/9 in corners).
    blk = copy.deepcopy(getattr(net, block))
    cin = blk.branch_pool.conv.in_channels
    out = _pool_branch_output(blk, torch.ones(1, cin, 6, 6))
    assert torch.allclose(out, torch.ones_like(out), atol=1e-6)
    x = torch.zeros(1, cin, 6, 6)
    x[0, 0, 0, 0] = 1.0
    out = _pool_branch_output(blk, x)[0]
    assert out[0, 0].item() == pytest.approx(1 / 4)  # corner window: 2 x 2 in-image values
    assert out[0, 1].item() == pytest.approx(1 / 6)  # edge window: 2 x 3
    assert out[1, 1].item() == pytest.approx(1 / 9)  # interior window: 3 x 3
    assert out[2:].abs().max() == 0 and out[:, 2:].abs().max() == 0


def test_mixed_7c_pool_is_max(net):
    assert net.Mixed_7b.pool == "avg" and net.Mixed_7c.pool == "max"
    x = torch.zeros(1, 2048, 5, 5)
    x[0, 0, 2, 2] = 3.0
    out = _pool_branch_output(copy.deepcopy(net.Mixed_7c), x)
    want = torch.zeros(5, 5)
    want[1:4, 1:4] = 3.0  # the spike spreads unchanged over its 3x3 neighbourhood (an average would give 1/3)
    assert torch.allclose(out[0], want, atol=1e-6)


# -- loading user-provided weights -----------------------------------------------------------------
def test_load_pth_and_safetensors(net, images, feats, files):
    pth, st, _ = files
    fa = feats[0]
    assert fa.shape == (4, 2048) and fa.dtype == torch.float32 and torch.isfinite(fa).all()
    assert fa.abs().mean() > 1e-2 and (fa - fa[0]).abs().max() > 1e-3  # O(1) and image-dependent
    a = I.load_fid_inception(pth)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert torch.equal(a.features(images[0]), fa)  # a second instance, same weights: bit-identical
    b = I.load_fid_inception(st)
    for k, v in net.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    # an iterable of batches, as a DataLoader gives them ((images, labels) pairs too): 2 + 1 images
    fb = b.features([images[0][:2], (images[0][2:3], torch.zeros(1))])
    assert fb.shape == (3, 2048) and torch.allclose(fb, fa[:3], rtol=1e-4, atol=1e-5)


def test_load_without_batch_counters(files, tmp_path):
    # files saved before PyTorch 0.4.1 carry no num_batches_tracked buffers
    _, _, state = files
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(old) == len(state) - 94
    save_file(old, str(tmp_path / "old.safetensors"))
    m = I.load_fid_inception(tmp_path / "old.safetensors")
    for k, v in old.items():
        assert torch.equal(m.state_dict()[k], v), k


def _expect_fit_error(state, *needles):
    with pytest.raises(ValueError) as e:
        I.check_fid_state_dict(state)
    msg = str(e.value)
    for n in (*needles, I.STANDARD_WEIGHTS, "pytorch-fid/releases"):
        assert n in msg, (n, msg)
    return msg


def test_key_and_shape_check(files, tmp_path):
    _, _, state = files
    dropped = {k: v for k, v in state.items() if k != "Mixed_6c.branch7x7_2.bn.running_mean"}
    _expect_fit_error(dropped, "missing keys: Mixed_6c.branch7x7_2.bn.running_mean")
    reshaped = dict(state, **{"Mixed_5d.branch5x5_2.conv.weight": torch.zeros(64, 48, 3, 3)})
    _expect_fit_error(reshaped, "wrong shapes: Mixed_5d.branch5x5_2.conv.weight (64, 48, 3, 3) "
                                "(expected (64, 48, 5, 5))")
    added = dict(state, **{"AuxLogits.fc.weight": torch.zeros(1000, 768)})
    _expect_fit_error(added, "unexpected keys: AuxLogits.fc.weight")
    tv = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    _expect_fit_error(tv, "torchvision's ImageNet Inception-v3", "fc.bias (1000,) (expected (1008,))")
    # through a file: the path is named, and nothing is loaded
    save_file(dropped, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*\n.*missing keys"):
        I.load_fid_inception(tmp_path / "bad.safetensors")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=I.STANDARD_WEIGHTS):
        I.load_fid_inception(tmp_path / I.STANDARD_WEIGHTS)
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.pth/\.pt state dict or a \.safetensors"):
        I.load_fid_inception(tmp_path / "w.ckpt")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        I.load_fid_inception(tmp_path / "list.pth")


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2), "x": MarkerPayload(marker)}, evil)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pth.*arbitrary .*it calls \S*open\b"):
        I.load_fid_inception(evil)
    assert not marker.exists()
    # the payload is live: a plain unpickler would have run it
    torch.load(evil, weights_only=False)["x"].close()
    assert marker.exists()


# -- the input convention --------------------------------------------------------------------------
def test_preprocess_matches_pytorch_fid_convention(net):
    g = torch.Generator().manual_seed(2)
    k = torch.randint(0, 256, (2, 3, 20, 28), generator=g, dtype=torch.uint8)  # 8-bit pixels
    x = k.float() / 127.5 - 1.0  # the same images in [-1, 1]
    # pytorch-fid: uint8 -> [0, 1] -> bilinear 299x299 (align_corners=False, no antialias) -> 2x - 1
    want = 2 * F.interpolate(k.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    for got in (net.preprocess(x), net.preprocess(k), net.preprocess(x, quantize=False)):
        assert got.shape == (2, 3, 299, 299) and got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-6)
    corners = 2 * F.interpolate(k.float() / 255, size=(299, 299), mode="bilinear", align_corners=True) - 1
    assert (corners - want).abs().max() > 1e-2  # the conventions differ: the check above can fail
    # downsampling: no antialiasing (pytorch-fid's call), which does differ from antialias=True
    big = torch.randint(0, 256, (1, 3, 331, 420), generator=g, dtype=torch.uint8)
    plain = 2 * F.interpolate(big.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    anti = 2 * F.interpolate(big.float() / 255, size=(299, 299), mode="bilinear", antialias=True) - 1
    assert torch.allclose(net.preprocess(big), plain, atol=1e-6) and (anti - plain).abs().max() > 1e-2
    # quantize=True rounds like images.to_uint8 (a PNG); 299 x 299 input is not resampled
    y = torch.rand(1, 3, 299, 299, generator=g) * 2 - 1
    assert torch.allclose(net.preprocess(y, quantize=False), y, atol=1e-6)
    assert torch.allclose(net.preprocess(y), ((y + 1) * 127.5).round() / 127.5 - 1, atol=1e-6)
    assert not torch.allclose(net.preprocess(y), y, atol=1e-4)


def test_grey_equals_repeated_rgb(net):
    g = torch.Generator().manual_seed(3)
    grey = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    seen = []
    hook = net.Mixed_7c.register_forward_hook(lambda m, inp, out: seen.append(out))
    try:
        fg = net.features(grey)
    finally:
        hook.remove()
    assert fg.shape == (2, 2048) and seen[0].shape == (2, 2048, 8, 8)
    assert torch.allclose(fg, seen[0].mean(dim=(2, 3)), rtol=1e-6, atol=1e-7)  # pool3: Mixed_7c averaged
    assert torch.equal(fg, net.features(grey.expand(-1, 3, -1, -1)))


def test_bad_images(net):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) with C = 1 or 3.*permute"):
        net.features(torch.zeros(2, 32, 32, 3))
    with pytest.raises(ValueError, match="in \\[0, 255\\] need x / 127.5 - 1"):
        net.features(torch.full((2, 3, 8, 8), 200.0))
    with pytest.raises(ValueError, match="NaN"):
        net.features(torch.full((2, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="batch_size"):
        net.features(torch.zeros(2, 3, 8, 8), batch_size=0)


# -- FID -------------------------------------------------------------------------------------------
def test_fid(net, images, feats, tmp_path):
    # two Frechet distances only: each needs 2048 x 2048 float64 eigendecompositions (seconds here)
    mu_a, s_a = feature_statistics(feats[0])
    mu_b, s_b = feature_statistics(feats[1])
    assert mu_a.shape == (2048,) and s_a.shape == (2048, 2048)
    scale = np.trace(s_a) + np.trace(s_b)
    path = I.save_fid_statistics(tmp_path / "ref.npz", mu_a, s_a)
    same = I.fid(images[0], path, net)  # recomputes a's features (deterministic): only FD's rounding is left
    assert abs(same) <= 1e-5 * scale
    differ = I.fid((mu_b, s_b), (mu_a, s_a), net)
    assert differ > 0.1 * scale and differ > 1e3 * abs(same)
    # FD = |mu_a - mu_b|^2 + (a squared Bures distance >= 0), and the Bures part is <= tr(S_a) + tr(S_b)
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    assert mean_term - 1e-6 * scale <= differ <= mean_term + scale
    mu, s = I.load_fid_statistics(path)
    assert np.array_equal(mu, mu_a) and np.array_equal(s, s_a)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        I.load_fid_statistics(tmp_path / "other.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="a single array"):
        I.load_fid_statistics(tmp_path / "one.npy")
    (tmp_path / "pickled.npz").write_bytes(pickle.dumps({"mu": np.zeros(2)}))
    with pytest.raises(ValueError, match="cannot read FID statistics"):
        I.load_fid_statistics(tmp_path / "pickled.npz")
    with pytest.raises(FileNotFoundError, match="save_fid_statistics"):
        I.load_fid_statistics(tmp_path / "missing.npz")



@pytest.mark.gpu
def test_cuda_features_follow_the_tolerance_rule(net, images):
    # docs/DESIGN.md's rule with the CPU fp32 network as the reference and CPU float64 as the truth.
    # TF32 is switched off: it is PyTorch's cuDNN default but not an fp32 path.
    x = images[0][:2]
    truth = copy.deepcopy(net).double()
    truth = truth(truth.preprocess(x))  # (2, 2048) float64
    reference = net(net.preprocess(x))
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        fast = copy.deepcopy(net).cuda().features(x)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert_close_to_reference(fast, reference, truth, torch.float32, "FID Inception on CUDA")
