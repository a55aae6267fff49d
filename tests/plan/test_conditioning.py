"""Conditioning and classifier-free guidance through the reference sampler, the fused step kernel,
the Engine (chunks, CUDA graph bookkeeping), ONNX and the CLI, with the bad-input list."""

import copy
import importlib.util
import json
import math

import pytest
import torch

import ddim_fast as dd
from benchmarks import fake_cuda
from ddim_fast.conditioning import combine
from tests.helpers import assert_close_to_reference, class_unet, text_unet

SCHED = dd.NoiseSchedule.linear(1000, 1e-4, 0.02)


@pytest.fixture(scope="module")
def cond_unet():
    return class_unet(5, seed=0)


class LabelEps(torch.nn.Module):
    """A cheap class-conditional model for the Triton-interpreter tests of the guided paths: eps =
    tanh(a x + b t + emb[label]), per sample and label-dependent, so chunking and graph replays that mix
    up labels show. Labels 0..n-1, n the null label (cond_spec says so, as the UNet's does)."""

    def __init__(self, n=5, shape=(3, 8, 8)):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.n, self.shape = n, shape
        self.emb = torch.nn.Parameter(torch.randn(n + 1, *shape, generator=g))
        self.a = torch.nn.Parameter(torch.tensor(0.7))

    def cond_spec(self):
        return {"class_labels": {"shape": (), "dtype": torch.int64, "range": (0, self.n), "null": self.n,
                                 "about": f"class labels 0..{self.n - 1}; {self.n} is the null label"}}

    def forward(self, x, t, class_labels=None):
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.n, dtype=torch.int64, device=x.device)
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1) * 1e-3
        return torch.tanh(self.a * x + tt + self.emb[class_labels].to(x.dtype))


@pytest.fixture(scope="module")
def label_eps():
    return LabelEps().eval()


def _plan(S=4, **kw):
    return dd.SamplingPlan.build(SCHED, S, spacing="trailing", **kw)


def _x(m, B=3, seed=0):
    return torch.randn(B, *dd.checks.sample_shape(m), generator=torch.Generator().manual_seed(seed))


Y = torch.tensor([0, 4, 2])


# -- the reference sampler ----------------------------------------------------------------------------------
def test_guidance_0_is_unconditional_1_is_conditional(cond_unet):
    x, plan = _x(cond_unet), _plan(eta=0.5)
    m64 = copy.deepcopy(cond_unet).double()
    cond = dd.sample(m64, x.double(), plan, seed=1, cond={"class_labels": Y})
    null = dd.sample(m64, x.double(), plan, seed=1)
    g1 = dd.sample(m64, x.double(), plan, seed=1, cond={"class_labels": Y}, guidance=1.0)
    g0 = dd.sample(m64, x.double(), plan, seed=1, cond={"class_labels": Y}, guidance=0.0)
    g3 = dd.sample(m64, x.double(), plan, seed=1, cond={"class_labels": Y}, guidance=3.0)
    torch.testing.assert_close(g1, cond, rtol=0, atol=1e-12)
    torch.testing.assert_close(g0, null, rtol=0, atol=1e-12)
    assert (g3 - cond).abs().max() > 1e-2 and (cond - null).abs().max() > 1e-2


def test_guided_step_is_the_combine_of_one_doubled_call(cond_unet):
    """One network call per step on [uncond; cond] (2B), then m = m_u + w (m_c - m_u)."""
    calls = []

    def model(x, t, class_labels=None):
        calls.append((x.shape[0], class_labels.tolist()))
        return cond_unet(x, t, class_labels=class_labels)

    x, plan = _x(cond_unet), _plan()
    dd.sample(model, x, plan, cond={"class_labels": Y}, uncond={"class_labels": torch.tensor([5, 5, 1])},
              guidance=2.0)
    assert calls == [(6, [5, 5, 1, 0, 4, 2])] * plan.steps
    m2 = torch.randn(4, 3)
    torch.testing.assert_close(combine(m2, 2.0), m2[:2] + 2.0 * (m2[2:] - m2[:2]))


def test_noise_depends_only_on_seed_and_index(cond_unet):
    """Sample k's noise is the same whatever the batch and with or without guidance."""
    plan = _plan(eta=1.0)
    eng = dd.Engine(cond_unet, plan, backend="reference", device="cpu")
    a = eng.sample(3, seed=5, cond={"class_labels": Y}, guidance=2.0)
    b = eng.sample(1, seed=5, first_index=2, cond={"class_labels": Y[2:]}, guidance=2.0)
    torch.testing.assert_close(a[2:], b, rtol=0, atol=1e-4)  # float32 convs differ slightly with the batch
    x_T = dd.rng.initial_noise(5, (3, *eng.shape))
    z = torch.stack([dd.rng.step_noise(5, i, x_T.shape) for i in range(plan.steps)])
    torch.testing.assert_close(a, eng(x_T, noise=z, cond={"class_labels": Y}, guidance=2.0), rtol=0, atol=1e-6)


def test_invert_takes_cond(cond_unet):
    plan = _plan(8)
    x0 = _x(cond_unet).clamp(-1, 1) * 0.5
    m64 = copy.deepcopy(cond_unet).double()
    lat = dd.invert(m64, x0.double(), plan, cond={"class_labels": Y})
    back = dd.sample(m64, lat, plan, cond={"class_labels": Y})
    other = dd.invert(m64, x0.double(), plan, cond={"class_labels": torch.tensor([1, 1, 1])})
    assert back.shape == x0.shape and (other - lat).abs().max() > 1e-3  # the labels steer the encoding
    eng = dd.Engine(cond_unet, plan, backend="reference", device="cpu")
    torch.testing.assert_close(eng.invert(x0, cond={"class_labels": Y}), lat.float(), rtol=0, atol=1e-4)


# -- the fused step kernel: the GUIDED prologue -------------------------------------------------------------
@pytest.mark.parametrize("clip, threshold", [(None, None), ((-1.0, 1.0), None), (None, (0.9, 1.5))])
def test_step_kernel_guided_matches_the_reference(clip, threshold):
    pytest.importorskip("triton")
    from ddim_fast.kernels import ddim_step as k

    plan = _plan(3, eta=0.7)
    coef = plan.to("cpu", torch.float32).coef
    g = torch.Generator().manual_seed(3)
    B = 3
    x = torch.randn(B, 3, 5, 7, generator=g)  # odd sizes: masked tails
    m2 = torch.randn(2 * B, 3, 5, 7, generator=g) * 2
    w = torch.tensor([2.5])
    for dtype in (torch.float32, torch.float16):
        got = k.ddim_step(x.clone(), m2.to(dtype), coef, torch.tensor([1], dtype=torch.int32), clip=clip,
                          threshold=threshold, guidance=w)
        want, _ = k.ddim_step_ref(x.double(), m2.to(dtype).double(), coef.double(), 1, clip=clip,
                                  threshold=threshold, guidance=2.5)
        low, _ = k.ddim_step_ref(x, m2.to(dtype), coef, 1, clip=clip, threshold=threshold, guidance=2.5)
        assert_close_to_reference(got, low, want, torch.float32, f"guided step {dtype} {clip} {threshold}")
    with pytest.raises(ValueError, match="doubled batch"):
        k.ddim_step(x.clone(), m2[:B].contiguous(), coef, torch.tensor([1], dtype=torch.int32), guidance=w)
    with pytest.raises(ValueError, match=r"guidance must be a \(1,\) float32"):
        k.ddim_step(x.clone(), m2, coef, torch.tensor([1], dtype=torch.int32), guidance=2.5)


# -- the Engine: triton, chunks, the CUDA graph's bookkeeping -------------------------------------------------
def test_triton_engine_with_chunks_matches_the_reference(label_eps, monkeypatch):
    pytest.importorskip("triton")
    from ddim_fast.kernels import ddim_step as step_mod

    monkeypatch.setattr(step_mod, "MAX_BATCH", 2)  # 3 samples run as 2 + 1: cond split with them
    plan = _plan(3, eta=0.5)
    y = torch.tensor([3, 1, 0])
    eng = dd.Engine(label_eps, plan, backend="triton", device="cpu", shape=label_eps.shape)
    assert eng.max_batch == 2
    got = eng.sample(3, seed=2, cond={"class_labels": y}, guidance=2.0)
    x_T = dd.rng.initial_noise(2, (3, *eng.shape))
    low = dd.sample(label_eps, x_T, plan, seed=2, cond={"class_labels": y}, guidance=2.0).clamp(-1, 1)
    truth = dd.sample(copy.deepcopy(label_eps).double(), x_T.double(), plan, seed=2, cond={"class_labels": y},
                      guidance=2.0).clamp(-1, 1)
    assert_close_to_reference(got, low, truth, torch.float32, "triton guided, chunks")


def test_new_labels_and_scale_do_not_recapture(label_eps, monkeypatch):
    """The cuda_graph backend on a CPU with the capture replaced by replaying the body (the GPU suite's
    dry run): labels and the scale live in static buffers / a device scalar."""
    pytest.importorskip("triton")
    from ddim_fast.backends.cuda_graph import CudaGraphBackend
    from ddim_fast.conditioning import resolve

    fake_cuda.replay_graphs(monkeypatch.setattr)
    plan = _plan(2)
    runner = CudaGraphBackend(label_eps, plan, device=torch.device("cpu"), dtype=torch.float32, shape=label_eps.shape)
    ref = dd.Engine(label_eps, plan, backend="reference", device="cpu", shape=label_eps.shape)

    def cc(y, w):
        return resolve(label_eps, len(y), {"class_labels": y}, None, w)

    runner.sample(3, plan, seed=1, first_index=0, cond=cc(Y, 2.0))
    b = runner.sample(3, plan, seed=1, first_index=0, cond=cc(torch.tensor([1, 1, 3]), 4.0))
    assert runner.captures == 1
    y2 = torch.tensor([1, 1, 3])
    low = ref.sample(3, seed=1, cond={"class_labels": y2}, guidance=4.0)
    x_T = dd.rng.initial_noise(1, (3, *ref.shape))
    truth = dd.sample(copy.deepcopy(label_eps).double(), x_T.double(), plan, cond={"class_labels": y2},
                      guidance=4.0).clamp(-1, 1)
    assert_close_to_reference(b.clamp(-1, 1), low, truth, torch.float32, "replayed graph, new labels and scale")
    runner.sample(3, plan, seed=1, first_index=0, cond=cc(Y, None))  # plain conditional: another graph
    runner.sample(3, plan, seed=1, first_index=0)
    assert runner.captures == 3


# -- ONNX -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unroll", [True, False])
def test_onnx_engine_guided_and_metadata(cond_unet, unroll, tmp_path, monkeypatch):
    """The CPU Engine (the network in ONNX Runtime, the reference loop: guidance is its doubled batch) and the
    guided whole-sampler export, unrolled and as a Loop."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("DDIM_FAST_CACHE", str(tmp_path))
    plan = _plan(3, eta=0.5)
    eng = dd.Engine(cond_unet, plan, backend="onnxruntime", device="cpu")
    x = _x(cond_unet)
    for kw in ({"cond": {"class_labels": Y}, "guidance": 2.0}, {"cond": {"class_labels": Y}}, {}):
        got = eng(x, seed=3, **kw)
        low = dd.sample(cond_unet, x, plan, seed=3, **kw).clamp(-1, 1)
        truth = dd.sample(copy.deepcopy(cond_unet).double(), x.double(), plan, seed=3, **kw).clamp(-1, 1)
        assert_close_to_reference(got, low, truth, torch.float32, f"onnx {unroll} {kw}")
    from ddim_fast.onnx.export import onnx_metadata

    path = dd.export_onnx(cond_unet, tmp_path / "g.onnx", plan=plan, guided=True, unroll=unroll)
    meta = onnx_metadata(path)
    assert meta["guided"] is True and meta["conditioning"]["class_labels"]["null"] == 5
    assert {"x_T", "noise", "class_labels", "uncond_class_labels", "guidance"} == set(meta["inputs"])
    net = onnx_metadata(dd.export_onnx(cond_unet, tmp_path / "n.onnx"))
    assert set(net["inputs"]) == {"x", "t", "class_labels"}


def test_multistep_samplers_compose_with_guidance(cond_unet, label_eps, tmp_path, monkeypatch):
    """Multistep samplers with guidance: a history sampler consumes the guided m however it was formed, on the
    reference, the fused Triton step (interpreter) and the ONNX table graph."""
    monkeypatch.setenv("DDIM_FAST_CACHE", str(tmp_path))
    kw = {"cond": {"class_labels": Y}, "guidance": 2.5}
    for sampler in ("dpmpp_2m", "unipc"):
        plan = _plan(4, sampler=sampler)
        x = _x(cond_unet)
        ref64 = dd.sample(copy.deepcopy(cond_unet).double(), x.double(), plan, **kw)
        low = dd.sample(cond_unet, x, plan, **kw)
        unguided = dd.sample(cond_unet, x, plan, cond=kw["cond"])
        assert (low - unguided).abs().max() > 1e-3  # the scale matters
        if sampler == "dpmpp_2m":
            pytest.importorskip("onnxruntime")
            eng = dd.Engine(cond_unet, plan, backend="onnxruntime", device="cpu")
            assert_close_to_reference(eng(x, **kw), low.clamp(-1, 1), ref64.clamp(-1, 1), torch.float32,
                                      "onnx multistep + cfg")
        if importlib.util.find_spec("triton") is not None:
            xs = dd.rng.initial_noise(4, (3, *label_eps.shape))
            eng = dd.Engine(label_eps, plan, backend="triton", device="cpu", shape=label_eps.shape)
            got = eng(xs, **kw)
            want = dd.sample(label_eps, xs, plan, **kw).clamp(-1, 1)
            truth = dd.sample(copy.deepcopy(label_eps).double(), xs.double(), plan, **kw).clamp(-1, 1)
            assert_close_to_reference(got, want, truth, torch.float32, f"triton {sampler} + cfg")


# -- the CLI ----------------------------------------------------------------------------------------------------
def test_cli_sample_class_and_guidance(tmp_path, capsys):
    from ddim_fast.cli import main

    out = tmp_path / "threes.png"
    args = ["sample", "--model", "digits-cond", "--class", "3", "--guidance", "2", "--num", "4", "--steps", "4",
            "--backend", "reference", "--out", str(out), "--no-progress"]
    assert main(args) == 0 and out.is_file()
    folder = tmp_path / "run"
    base = ["sample", "--model", "digits-cond", "--num", "2", "--steps", "2", "--backend", "reference",
            "--out", str(folder), "--no-progress", "--class", "1", "7"]
    assert main(base + ["--guidance", "1.5"]) == 0
    settings = json.loads((folder / "manifest.json").read_text())["settings"]
    assert settings["class"] == [1, 7] and settings["guidance"] == 1.5
    (folder / "manifest.json").write_text(json.dumps({"complete": False, "settings": settings}))
    (folder / "000001.png").unlink()
    assert main(base + ["--guidance", "3"]) == 2  # a resume with another scale is refused
    assert "guidance: 1.5 in the folder, 3.0 now" in capsys.readouterr().err


# -- bad input: one clear line each -------------------------------------------------------------------------------
def test_bad_conditioning_inputs(cond_unet):
    x, plan = _x(cond_unet), _plan(2)
    bad = [
        (dict(cond={"class_labels": torch.tensor([0, 6, 1])}), r"must be in \[0, 5\].*got values from 0 to 6"),
        (dict(cond={"class_labels": torch.tensor([0, -1, 1])}), r"must be in \[0, 5\]"),
        (dict(cond={"class_labels": torch.tensor([0, 1])}), "has batch 2 but the state has 3 samples"),
        (dict(cond={"class_labels": Y}, uncond={"class_labels": Y[:2]}), "uncond.*has batch 2"),
        (dict(cond={"class_labels": Y}, guidance=math.inf), "guidance must be a finite number"),
        (dict(cond={"class_labels": Y}, guidance=float("nan")), "guidance must be a finite number"),
        (dict(cond={"class_labels": Y}, guidance=True), "guidance must be a finite number"),
        (dict(guidance=2.0), "guidance needs cond"),
        (dict(cond={"class_labels": Y}, uncond={"class_labels": Y}), "uncond is used only with guidance"),
        (dict(cond={"class_labels": Y.float()}), "must be an integer tensor"),
        (dict(cond={"labels": Y}), "cond has labels, which this model does not take; it takes class_labels"),
        (dict(cond=[Y]), "cond must be a dict of tensors"),
    ]
    eng = dd.Engine(cond_unet, plan, backend="reference", device="cpu")
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            dd.sample(cond_unet, x, plan, **kw)
        with pytest.raises(ValueError, match=match):
            eng(x, **kw)


def test_guidance_without_an_unconditional_branch():
    """A model with no null input (an unknown callable, or a text model) needs uncond given."""
    def model(x, t, emb=None):
        return x * 0.1 + emb.mean() * 0

    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="guidance needs an unconditional branch.*pass uncond="):
        dd.sample(model, x, _plan(2), cond={"emb": torch.randn(2, 5)}, guidance=2.0)
    out = dd.sample(model, x, _plan(2), cond={"emb": torch.randn(2, 5)}, uncond={"emb": torch.zeros(2, 5)},
                    guidance=2.0)
    assert out.shape == x.shape
    plain = dd.UNet(dd.UNetConfig.tiny()).eval()
    with pytest.raises(ValueError, match="it takes no conditioning"):
        dd.sample(plain, _x(plain, 2), _plan(2), cond={"class_labels": torch.tensor([0, 1])}, guidance=2.0)


def test_text_unet_without_encoder_hidden_states():
    unet = text_unet()
    eng = dd.Engine(unet, _plan(2), backend="reference", device="cpu")
    assert eng.shape == (4, 8, 8)
    with pytest.raises(ValueError, match="this model needs encoder_hidden_states in cond"):
        eng.sample(2)
    ehs = torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match="guidance needs an unconditional branch"):
        eng.sample(2, cond={"encoder_hidden_states": ehs}, guidance=3.0)
    with pytest.raises(ValueError, match=r"must have shape \(B, L, 32\)"):
        eng.sample(2, cond={"encoder_hidden_states": torch.randn(2, 3, 16)})
    assert eng.sample(2, cond={"encoder_hidden_states": ehs}, uncond={"encoder_hidden_states": 0 * ehs},
                      guidance=3.0).shape == (2, 4, 8, 8)
