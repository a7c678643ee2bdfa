"""uniopd-mcore: Uni-OPD on-policy distillation on Megatron-Core, SGLang and Triton.

The folder ``kernels/`` is installed under the import name ``uniopd_kernels`` so that no generic
top-level package called ``kernels`` ends up in site-packages.
"""

from setuptools import find_packages, setup

CORE = [
    # torch is installed first by the Makefile (pinned CPU wheel on machines without CUDA);
    # the range here is what the code is tested with.
    "torch>=2.6",
    "megatron-core>=0.16.1",
    # HF <-> Megatron weight mapping (learner/hf_weights.py); its own extra pulls nothing we lack.
    "mbridge>=0.15.1",
    "einops>=0.8",
    "triton>=3.3",
    "transformers>=4.56",
    "tokenizers>=0.21",
    "safetensors>=0.5",
    "omegaconf>=2.3",
    "pyyaml>=6.0",
    "pyarrow>=17",
    "math-verify>=0.8",
    "numpy>=1.26",
    "tqdm>=4.66",
    "tensorboard>=2.17",
    "matplotlib>=3.8",
]

EXTRAS = {
    # GPU nodes and the Docker image; never imported on the CPU path.
    "sglang": ["sglang>=0.5.6"],
    "te": ["transformer-engine[pytorch]>=2.8"],
    "flash-attn": ["flash-attn>=2.7"],
    "liger": ["liger-kernel>=0.6"],
    "test": ["pytest>=8", "hypothesis>=6.100"],
}

setup(
    name="uniopd-mcore",
    version="0.1.0",
    description="Uni-OPD on-policy distillation trainer on Megatron-Core with SGLang engines and Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["uniopd_mcore", "uniopd_mcore.*"]) + ["uniopd_kernels"],
    package_dir={"uniopd_kernels": "kernels"},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["uniopd-mcore=uniopd_mcore.cli:main"]},
)
