"""setup.py exists to build llamba's optional Cython extensions.

If there is no C compiler (or Cython is missing), the build of the extensions is skipped with a
warning and the install still succeeds: the Numba kernels are used instead.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any failure means "no extension", never "no install"
            print(f"llamba: optional Cython extensions not built ({e}); using Numba kernels", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"llamba: optional extension {ext.name} not built ({e}); using Numba kernels", file=sys.stderr)


def extensions():
    if os.environ.get("LLAMBA_NO_EXT"):
        return []
    pyx = sorted(glob.glob(os.path.join("kernels", "*.pyx")))
    if not pyx:
        return []
    try:
        from Cython.Build import cythonize
        import numpy as np
    except Exception:  # noqa: BLE001
        return []
    from setuptools import Extension
    exts = [Extension("llamba.kernels." + os.path.splitext(os.path.basename(p))[0], [p],
                      include_dirs=[np.get_include()], extra_compile_args=["-O3"]) for p in pyx]
    try:
        return cythonize(exts, language_level=3, quiet=True)
    except Exception as e:  # noqa: BLE001
        print(f"llamba: cythonize failed ({e}); using Numba kernels", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
