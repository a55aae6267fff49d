"""Tier 3: every shipped kernel configuration compiled ahead of time for sm_80 and sm_90 (no GPU
needed), with registers, shared memory and spills from ptxas. Catches what the interpreter
forgives; a spill in the memory-bound step or GroupNorm kernels fails.

Runs `python -m ddim_fast.cli aot` (`ddim-fast aot`) in a subprocess without TRITON_INTERPRET
(under it, @triton.jit returns interpreter objects that cannot be compiled). The table is printed
(pytest -s shows it) and attached to any failure. The UNet shapes it compiles for are recorded
from the UNetConfig presets and the bundled models (ddim_fast/cli/aot.py); a test ties them.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    run = subprocess.run([sys.executable, "-m", "ddim_fast.cli", "aot", "--json", str(path)], env=env,
                         capture_output=True, text=True, timeout=900)
    print(run.stdout)
    assert path.exists(), f"the AOT run wrote nothing (rc {run.returncode}):\n{run.stdout}\n{run.stderr}"
    report = json.loads(path.read_text())
    return report, run


def test_every_config_compiles_for_sm80_and_sm90(aot):
    report, run = aot
    rows = report["rows"]
    errors = [f"{r['kernel']} [{r['config']}] sm_{r['cc']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors) + "\n" + run.stdout
    by_config = {}
    for r in rows:
        by_config.setdefault((r["kernel"], r["config"]), set()).add(r["cc"])
    assert all(ccs == {80, 90} for ccs in by_config.values())
    kernels = {k for k, _ in by_config}
    assert kernels == {"ddim_step", "initial_noise", "abs_order_stats", "group_norm", "group_norm_stats", "attention"}
    # the step kernel ships every constexpr combination: noise x clip mode x x0 output x flag
    step_labels = {c for k, c in by_config if k == "ddim_step" and c.endswith("m=fp16")}
    assert len(step_labels) == 2 * 3 * 2 * 2
    # and the guided (classifier-free guidance) prologue with the Engine's flag: noise x clip mode
    guided = {c for k, c in by_config if k == "ddim_step" and c.endswith("m=fp16 cfg")}
    assert len(guided) == 2 * 3 and all("x0=0 flag=1" in c for c in guided)
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["shared"] <= 228 * 1024, r


def test_no_spills_in_the_memory_bound_kernels(aot):
    report, run = aot
    spills = [r for r in report["rows"] if r["kernel"] != "attention" and (r["spill_stores"] or r["spill_loads"])]
    assert not spills, "spills:\n" + "\n".join(f"{r['kernel']} [{r['config']}] sm_{r['cc']}" for r in spills)
    assert report["failures"] == [] and run.returncode == 0, run.stdout + run.stderr


def test_ptxas_log_parsing():
    from ddim_fast.kernels.aot import parse_ptxas

    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 576 bytes cmem[0]\n")
    assert parse_ptxas(log) == dict(registers=168, spill_stores=16, spill_loads=12, stack=24)
    with pytest.raises(RuntimeError, match="registers"):
        parse_ptxas("nothing here")


def _ddpm_group_norm_shapes(cfg):
    """{(C, H*W, groups)} of every GroupNorm input of the DDPM UNet, restated from the architecture
    (the table kernels/aot.py used to carry for four presets)."""
    ch, mult, res, blocks = cfg.ch, cfg.ch_mult, cfg.resolution, cfg.num_res_blocks
    shapes, block_in, skips = set(), ch, [ch]
    for i, m in enumerate(mult):  # down: ResBlocks (norm1 on the input, norm2 on the output)
        for _ in range(blocks):
            shapes |= {(block_in, res * res), (ch * m, res * res)}
            block_in = ch * m
            skips.append(block_in)
        if i != len(mult) - 1:
            res //= 2
            skips.append(block_in)
    shapes.add((block_in, res * res))  # middle
    for i in reversed(range(len(mult))):  # up: ResBlocks on [h, skip]
        for _ in range(blocks + 1):
            shapes |= {(block_in + skips.pop(), res * res), (ch * mult[i], res * res)}
            block_in = ch * mult[i]
        if i != 0:
            res *= 2
    return {(c, hw, cfg.num_groups) for c, hw in shapes}


def test_the_compiled_shapes_are_every_preset_and_bundled_model():
    """aot compiles for what the network really runs: the GroupNorm inputs recorded from a forward
    pass of every UNetConfig preset and every bundled model (the bundled digits models included),
    equal to the architecture's restatement, and each model's sample size."""
    from ddim_fast.checkpoint import bundled_configs, bundled_names
    from ddim_fast.cli.aot import model_shapes
    from ddim_fast.models.unet import PRESETS, UNetConfig

    table = model_shapes()
    assert set(table) == set(PRESETS) | {f"bundled:{n}" for n in bundled_names()}
    assert {"bundled:digits", "bundled:digits-cond"} <= set(table)
    configs = {n: UNetConfig.preset(n) for n in PRESETS}
    configs.update({f"bundled:{n}": c for n, c in bundled_configs().items()})
    for name, cfg in configs.items():
        group_norm, numel = table[name]
        assert set(group_norm) == _ddpm_group_norm_shapes(cfg), name
        assert numel == cfg.in_channels * cfg.resolution**2
    assert table["cifar10"][1] == 3 * 32 * 32 and table["bundled:digits"][1] == 16 * 16
