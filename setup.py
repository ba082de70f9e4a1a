"""Build entry point (setuptools). Everything -- metadata, dependencies, the package map (llamba <- engine/,
llamba.kernels <- kernels/) -- is declared in pyproject.toml; this file is kept for tools that still call
`python setup.py ...`. There is no compiled extension: the kernels are Numba-compiled on first use and cached
(`llamba warmup` does it ahead of time), so the install needs no C/C++/Cython toolchain."""
from setuptools import setup

setup()
