"""The default model (llamba.demo): assembled once from the `demo` extra's chunk files into $LLAMBA_CACHE, checked
by sha256. A stand-in package (three small chunks) replaces the real 250 MB one, so this runs in milliseconds."""
from __future__ import annotations

import hashlib
import io
import sys
import types

import pytest

from llamba import demo
from llamba.errors import LlambaError


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    parts = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 1000, b"tail"]
    paths = []
    for i, data in enumerate(parts):
        p = tmp_path / "wheel" / f"model.gguf.part{i}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        paths.append(p)
    pkg = types.ModuleType(demo.DEMO_PACKAGE)
    pkg.MODEL_NAME = "tiny-default.gguf"
    pkg.EXPECTED_SHA256 = hashlib.sha256(b"".join(parts)).hexdigest()
    pkg.chunk_paths = lambda: [str(p) for p in paths]
    monkeypatch.setitem(sys.modules, demo.DEMO_PACKAGE, pkg)
    monkeypatch.setenv("LLAMBA_CACHE", str(tmp_path / "cache"))
    return pkg, b"".join(parts)


def test_cache_dir_honours_llamba_cache_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMBA_CACHE", str(tmp_path / "a"))
    assert demo.cache_dir() == tmp_path / "a" and (tmp_path / "a").is_dir()
    monkeypatch.delenv("LLAMBA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "llamba"


def test_default_model_is_assembled_once(fake_package, tmp_path, monkeypatch):
    pkg, whole = fake_package
    log, progress = io.StringIO(), demo.progress  # (its default stream is bound to sys.stderr at import)
    monkeypatch.setattr(demo, "progress", lambda done, total, label: progress(done, total, label, stream=log))
    path = demo.default_model_path()
    assert path == str(tmp_path / "cache" / pkg.MODEL_NAME)
    with open(path, "rb") as f:
        assert f.read() == whole
    assert not list((tmp_path / "cache").glob("*.partial"))
    err = log.getvalue()  # not a terminal: one line at the start, one at the end
    assert "assembling the default model tiny-default.gguf" in err and err.rstrip().endswith("done")
    pkg.chunk_paths = lambda: pytest.fail("the cached model must be reused, not assembled again")
    assert demo.default_model_path() == path


def test_wrong_checksum_is_an_error_and_leaves_nothing(fake_package, tmp_path):
    pkg, _ = fake_package
    pkg.EXPECTED_SHA256 = "0" * 64
    with pytest.raises(LlambaError, match="sha256 mismatch"):
        demo.default_model_path()
    assert not list((tmp_path / "cache").iterdir())


def test_incomplete_or_missing_package_is_a_one_line_error(fake_package, monkeypatch):
    pkg, _ = fake_package

    def broken():
        raise FileNotFoundError("part 2 is missing")

    pkg.chunk_paths = broken
    with pytest.raises(LlambaError, match="incomplete .*part 2 is missing.*reinstall"):
        demo.default_model_path()
    monkeypatch.setitem(sys.modules, demo.DEMO_PACKAGE, None)  # import fails: not installed
    with pytest.raises(LlambaError, match=r"not installed: run `pip install 'llamba\[demo\]'`"):
        demo.default_model_path()


def test_progress_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    demo.progress(0, 4 << 20, "x", stream=out)
    demo.progress(2 << 20, 4 << 20, "x", stream=out)
    demo.progress(4 << 20, 4 << 20, "x", stream=out)
    frames = out.getvalue().split("\r")[1:]
    assert [f.split("]")[1].split("%")[0].strip() for f in frames] == ["0.0", "50.0", "100.0"]
    assert frames[1].startswith("x [" + "#" * 15 + " " * 15 + "]") and frames[-1].endswith("(4/4 MiB)\n")
