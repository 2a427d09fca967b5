from setuptools import find_packages, setup

setup(
    name="peft_umema",
    version="0.1.0",
    description="PEFT plugin: LoRA + Uncertainty Modeling + External Memory Augmentation (UMEMA)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["peft_umema", "peft_umema.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.2",
        "transformers>=5.0,<6",
        "peft>=0.21.2,<0.22",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "datasets>=3.0",
        "seqeval>=1.2",
        "scikit-learn>=1.3",  # benchmarks/confidence_forms.py (also required by seqeval)
        "torchmetrics>=1.4",
        "matplotlib>=3.7",
        "tqdm>=4.66",
        # QLoRA (--load-in-4bit / --load-in-8bit); 0.50 runs 4-bit and 8-bit layers on CPU too
        "bitsandbytes>=0.50",
        # the calibration metrics as an `evaluate` module (peft_umema.evaluation.calibration_metric)
        "evaluate>=0.4.6,<0.5",
        # what laplace-torch, BackPACK and Curvlinops need (the `laplace` baseline); those three come with
        # --no-deps from requirements-offline.txt, since their declared torchvision would replace this torch
        "asdfghjkl==0.1a4",
        "einops>=0.8",
        "unfoldNd>=0.2",
        "einconv>=0.1",
        "linear_operator>=0.6",
        "opt-einsum>=3.3",
        "scipy>=1.12",
    ],
    extras_require={
        # the offline demo backbones/data and laplace-torch are installed with --no-deps from requirements-offline.txt
        "demo": ["gguf>=0.10"],
        # DeepSpeed ZeRO-2/3 (tests/test_distributed.py; on CPU without a C++ compiler the tests route its
        # collectives through gloo). pip builds it as a pure-Python wheel, no CUDA or compiler needed to install.
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "test": ["pytest>=8", "gguf>=0.10", "deepspeed>=0.19,<0.20"],
    },
    entry_points={"console_scripts": ["peft-umema=peft_umema.cli:main"]},
)
