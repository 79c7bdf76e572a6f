"""Build script. Package metadata lives here; the CUDA extension (csrc/) is added when available."""

from setuptools import find_packages, setup

setup(
    name="fisherforget",
    version="0.1.0",
    description="Fisher-aware AdamW with fused Triton/CUDA kernels for graceful forgetting in LMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The Triton kernels live in the top-level kernels/ folder and ship as fisherforget.kernels.
    packages=find_packages(include=["fisherforget", "fisherforget.*"]) + ["fisherforget.kernels"],
    package_dir={"fisherforget.kernels": "kernels"},
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton"],
        "transformers": ["transformers>=4.40", "accelerate"],
        "test": ["pytest", "hypothesis", "numpy", "ninja"],
    },
    entry_points={"console_scripts": ["fisherforget=fisherforget.cli:main"]},
)
