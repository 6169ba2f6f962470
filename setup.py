"""diffdis: one diffusion UNet for text-to-image generation and zero-shot classification (DiffDis)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="diffdis",
    version="0.1.0",
    description="DiffDis: one diffusion UNet that generates images from text and classifies them zero-shot",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["diffdis", "diffdis.*"]),
    package_data={
        "diffdis": ["configs/*.yaml"],  # the shipped run configs: --config tiny | sd15
        "diffdis.eval": ["templates/*.json"],  # zero-shot class names and templates
    },
    # what diffdis imports (tensorboard: the default tracker of train.report_to); test tools are in the dev extra
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.30",
        "transformers>=4.40",
        "accelerate>=0.30",
        "datasets>=2.19",
        "omegaconf>=2.3",
        "torchmetrics>=1.0",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        "pillow>=10",
        "numpy>=1.24",
        "tqdm>=4.60",
        "tensorboard>=2.12",
    ],
    extras_require={
        "dev": ["pytest>=7"],
        "xformers": ["xformers>=0.0.25"],
        "fid": ["torch-fidelity>=0.3"],
    },
    entry_points={
        "console_scripts": [
            "diffdis-train=diffdis.cli.train:main",
            "diffdis-sample=diffdis.cli.sample:main",
            "diffdis-zeroshot=diffdis.cli.zeroshot:main",
            "diffdis-evaluate=diffdis.cli.evaluate:main",
            "diffdis-demo=diffdis.cli.demo:main",
            "diffdis-cache=diffdis.cli.cache:main",
            "diffdis-compare=diffdis.cli.compare:main",
        ],
    },
)
