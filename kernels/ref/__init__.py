"""Plain numpy reference implementations ("slow twins") of every kernel in llamba.kernels."""
