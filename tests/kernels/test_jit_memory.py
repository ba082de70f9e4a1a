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


PAGEOUT = textwrap.dedent('''
    import re
    import numpy as np
    from llamba.kernels import ops
    from llamba.kernels._jit import release_llvm_pages

    def llvm_rss():
        cur, tot = False, 0
        for line in open("/proc/self/smaps"):
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                cur = "libllvmlite" in line
            elif cur and line.startswith("Private_Clean:"):  # resident, mapped by this process only
                tot += int(line.split()[1])
        return tot

    x = np.ones((2, 8), np.float32)
    out = np.empty_like(x)
    ops.rms_norm(x, np.ones(8, np.float32), 1e-6, out)  # Numba/LLVM initialised, a kernel loaded
    before = llvm_rss()
    n = release_llvm_pages()
    after = llvm_rss()
    y = np.full((2, 8), 2.0, np.float32)
    ops.rms_norm(y, np.ones(8, np.float32), 1e-6, out)  # kernels still run (the pages come back on demand)
    ops.rms_norm(y[:1], np.ones(8, np.float32), 1e-6, out[:1])
    print("ADVISED", n, "BEFORE", before, "AFTER", after, "OK", bool(np.allclose(out, 1.0, atol=1e-3)))
''')


def test_release_llvm_pages_drops_resident_llvm_code_and_kernels_still_run(tmp_path):
    import os
    if not os.path.exists("/proc/self/smaps"):
        import pytest
        pytest.skip("needs Linux /proc")
    (tmp_path / "po.py").write_text(PAGEOUT)
    r = subprocess.run([sys.executable, "po.py"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    f = r.stdout.split()
    advised, before, after = int(f[1]), int(f[3]), int(f[5])
    assert f[7] == "True"
    if advised == 0:
        import pytest
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    # KiB of libllvmlite.so resident and mapped by this process only: none left after the release (pages the
    # pytest process maps as well are shared, and MADV_PAGEOUT leaves those alone; run alone, the child goes
    # from ~68 MiB to ~0.05)
    assert after <= 1024, (before, after)
