from setuptools import find_packages, setup

setup(
    name="shardlm",
    version="0.1.0",
    description="Parallel, resumable, checksummed token shards and one training loop for pretraining, SFT and DPO",
    python_requires=">=3.11",
    packages=find_packages(include=["preprocess", "preprocess.*", "training", "training.*"]),
    install_requires=[
        # A range, so that the CUDA build a cluster already has is kept; the Makefile installs the exact CPU build
        # first on machines without one (left to pip alone, a plain install pulls a multi-GB CUDA build). 2.11:
        # the oldest release the test suite has passed on (docs/training.md: supported versions).
        "torch>=2.11,<3",
        "numpy>=1.26",
        "sentencepiece>=0.2.0",
        "orjson>=3.9",
        "pyarrow>=14",
        "tqdm>=4.66",
        "omegaconf>=2.3",
        "tensorboard>=2.14",
        "matplotlib>=3.8",          # training.report
        "safetensors>=0.4",         # init_from a transformers directory
        "jinja2>=3.1.6",            # a model's own chat template (the sandbox transformers asks for)
    ],
    extras_require={
        "deepspeed": ["deepspeed==0.19.8"],
        "fast": ["gigatoken>=0.10"],  # preprocessing: the same ids as sentencepiece, several times faster
        "mpi": ["mpich", "mpi4py>=4"],  # mpirun, and MPI's own coordination for preprocessing
        "hf": ["transformers>=5.0"],  # training.export_hf
        "lora": ["peft>=0.17"],
        "dedup": ["datasketch>=1.6"],  # preprocess shards --dedup near
        "float8": ["torchao>=0.13"],  # train.float8 on GPUs with float8 matmuls
        "eval": ["lm-eval==0.4.13"],  # training.evaluate: the harness's tasks on our checkpoints
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3", "psutil>=5.9", "py-spy>=0.3", "ruff>=0.6",
                "mpich", "mpi4py>=4", "deepspeed==0.19.8", "transformers>=5.0", "peft>=0.17", "gigatoken>=0.10",
                "datasketch>=1.6", "torchao>=0.13", "lm-eval==0.4.13",
                # the reference for the preference losses' formulas (tests only; its loss code is internal, so
                # the exact version the parity tests were written against)
                "trl==1.16.0"],
    },
)
