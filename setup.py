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
    package_data={"diffdis.eval": ["templates/*.json"]},
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
        "scipy>=1.10",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "webdataset>=0.2",
    ],
    extras_require={
        "dev": ["pytest>=7"],
        "xformers": ["xformers>=0.0.25"],
        "fid": ["torch-fidelity>=0.3"],
    },
)
