"""Fused Triton kernels, imported as `ddim_fast.kernels`: installed there by setup.py's package_dir,
and reached in a bare source checkout (PYTHONPATH=., no install) through the committed relative
symlink ddim_fast/kernels -> ../kernels.

    ddim_step.py    ddim_step(x, m, coef, step, *, seed, first_index, clip, threshold, x0_out, flag)
                    the whole DDIM update in one pass, in place, noise drawn in-kernel
    group_norm.py   group_norm(x, weight, bias, num_groups, eps, *, add, silu, out)
                    GroupNorm with fp32 statistics, the time-embedding add before it, SiLU after
    attention.py    attention(q, k, v, *, out): single-head flash attention, head_dim <= 512
    aot.py          compile every shipped configuration for sm_80/sm_90 on a machine without a
                    GPU; registers, shared memory, spills (run it: `ddim-fast aot`)
    checks.py       the launchers' shared input checks

Each file also has `<op>_ref`, the same computation in plain PyTorch. These files import nothing
from the rest of ddim_fast. On a CPU the kernels run only under TRITON_INTERPRET=1, which must be
set before they are imported. Import the modules (`from ddim_fast.kernels.attention import
attention`): this package itself imports nothing, so it does not pull in Triton; it only checks
that Triton is installed (an extra: `ddim-fast[gpu]`, or `ddim-fast[dev]` for the interpreter
tests), so that a missing Triton is one clear line rather than "No module named 'triton'".
"""

import importlib.util as _util

if _util.find_spec("triton") is None:
    raise ModuleNotFoundError("ddim_fast.kernels needs Triton, which is not installed: pip install 'ddim-fast[gpu]' "
                              "(Linux; 'ddim-fast[dev]' for the interpreter tests)", name="triton")
