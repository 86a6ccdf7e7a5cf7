"""Install safety_dpo.

`torch` carries an ordinary lower bound here. On a CPU-only machine install the CPU build first
(`pip install torch==2.13.0`, see the README); pip then keeps it, because it satisfies the bound.
"""

from setuptools import find_packages, setup

install_requires = [
    "torch>=2.1",
    "diffusers>=0.32",
    "transformers>=4.46",
    "peft>=0.13",
    "trl>=0.12",
    "datasets>=3.0",
    "huggingface_hub>=0.26",
    "accelerate>=1.0",
    "safetensors>=0.4",
    "evaluate>=0.4",
    # Fréchet distances and CLIPScore (feature extractors are passed in: FID's Inception needs the fid extra).
    "torchmetrics>=1.4",
    "numpy>=1.24",
    "Pillow>=10.0",
    "PyYAML>=6.0",
    "Jinja2>=3.1",
    "tqdm>=4.66",
]

# Detectors and report charts. pytorch-fid (FID proper) is left to the `fid` extra because its torchvision pulls a
# CUDA build of torch on CPU-only machines unless the matching CPU build is installed first.
eval_requires = ["nudenet>=3.4", "matplotlib>=3.8"]

extras = {
    # The tests run NudeNet and draw report charts, so the development install takes the `eval` extra too.
    "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6", "tensorboard>=2.15", *eval_requires],
    "eval": eval_requires,
    "fid": ["pytorch-fid>=0.3", "scipy>=1.10"],
    # Tokenizers of many chat models need these; the OpenAI-compatible writer needs nothing beyond the stdlib.
    "llm": ["sentencepiece>=0.2", "protobuf>=4.25"],
}

setup(
    name="safety_dpo",
    version="0.1.0.dev0",
    description="SafetyDPO: safety alignment of text-to-image diffusion models with Diffusion-DPO experts and Co-Merge",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["safety_dpo", "safety_dpo.*"]) + ["safety_dpo.hub_cards"],
    package_dir={"safety_dpo.hub_cards": "hub_cards"},
    package_data={
        "safety_dpo.hub_cards": ["*.md"],
        "safety_dpo.microworld": ["assets/**/*", "assets/*"],
        "safety_dpo.data": ["templates/*.jinja", "*.yaml"],
    },
    include_package_data=True,
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["safety-dpo=safety_dpo.cli:main"]},
)
