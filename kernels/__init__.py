"""llamba.kernels: compute kernels (Numba) and their numpy reference twins.

Kernels never import model code. Every fast kernel in this package has a slow numpy twin
under ``llamba.kernels.ref`` that the tests compare it against.
"""
