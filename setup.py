# The metadata lives in pyproject.toml. This file exists for one mapping that is clearer here:
# the top-level folder `kernels/` is installed as `ddim_fast.kernels` (a different PyPI
# distribution owns the top-level name `kernels`). In a source checkout with no install
# (PYTHONPATH=.), the relative symlink ddim_fast/kernels -> ../kernels gives the same name; the
# mapping below makes wheels and editable installs copy or map the folder itself.
from setuptools import setup

setup(
    packages=["ddim_fast", "ddim_fast.backends", "ddim_fast.cli", "ddim_fast.models", "ddim_fast.models.ops",
              "ddim_fast.onnx", "ddim_fast.kernels", "ddim_fast.assets"],
    package_dir={"ddim_fast": "ddim_fast", "ddim_fast.kernels": "kernels"},
    package_data={"ddim_fast.assets": ["*/*.json", "*/*.safetensors", "*/plans/*.json"]},  # plans: tuned, bundled
    include_package_data=True,
)
