"""r1jax: DeepSeek-R1 training (GRPO, R1-Zero, the R1 pipeline, distillation) in JAX."""

from setuptools import find_packages, setup

setup(
    name="r1jax",
    version="0.1.0",
    description="DeepSeek-R1 training in JAX: GRPO, R1-Zero, the R1 pipeline and distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["r1jax", "r1jax.*", "configs"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "sentencepiece>=0.2",
        "tensorstore>=0.1.70",
        "numpy>=1.26",
        "safetensors>=0.5",
        "tokenizers>=0.21",
        "math-verify[antlr4_13_2]>=0.8",
        "ml_collections>=1.0",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch/transformers are references for parity tests and peer benchmarks only.
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=4.50", "ruff>=0.6"],
        # The peers of bench/grpo_step.py (TRL's GRPOTrainer), at the versions measured in bench/RESULTS.md.
        "bench": ["torch==2.13.0", "transformers>=4.56.2", "trl==1.13.0", "accelerate==1.15.0", "datasets==5.0.1"],
    },
)
