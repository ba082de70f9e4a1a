"""llamba.kernels._jit: kernels loaded from Numba's disk cache do not keep their parsed LLVM module, and a
function compiled later that links one of them still works (the module is parsed again from the kept bitcode)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from llamba.kernels import _jit

MODULE = textwrap.dedent('''
    import numpy as np
    from llamba.kernels import _jit
    from numba import njit

    @njit(cache=True)
    def base(x):
        s = 0.0
        for i in range(x.shape[0]):
            s += x[i] * x[i]
        return s
''')

CHECK = textwrap.dedent('''
    import sys
    import numpy as np
    from numba import njit
    import cachedmod
    x = np.arange(5.0)
    assert cachedmod.base(x) == 30.0
    lib = next(iter(cachedmod.base.overloads.values())).library
    loaded = cachedmod.base.stats.cache_hits.most_common(1)[0][1] if cachedmod.base.stats.cache_hits else 0
    print("HIT", loaded, "SHARED", lib._shared_module is not None)

    @njit  # not cached: compiled now, linking the cached library (its module is parsed again)
    def user(x):
        return cachedmod.base(x) + 1.0
    assert user(x) == 31.0
    print("LINKED_OK")
''')


def test_patch_applies_to_this_numba():
    assert _jit.PATCHED


def test_cached_kernel_drops_its_ir_and_still_links(tmp_path):
    (tmp_path / "cachedmod.py").write_text(MODULE)
    (tmp_path / "check.py").write_text(CHECK)
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    import os
    env = {**os.environ, **env}
    first = subprocess.run([sys.executable, "check.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "HIT 0" in first.stdout and "SHARED True" in first.stdout  # compiled here: nothing to drop
    second = subprocess.run([sys.executable, "check.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "HIT 1" in second.stdout and "SHARED False" in second.stdout and "LINKED_OK" in second.stdout
