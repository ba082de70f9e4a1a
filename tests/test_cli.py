"""The CLI: streams text, reports speed on stderr, reads the prompt from stdin, and turns every bad input into
one line on stderr with exit status 1 (no traceback)."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from tiny_models import write_model


def run(*args, stdin=None, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "llamba.cli", *args], capture_output=True, text=True,
                          input=stdin, env=e, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    write_model(p, "llama", n_ctx=64)
    return str(p)


def one_line_error(r, needle):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and needle in lines[0], lines[0]


def test_run_streams_and_reports_speed(model):
    r = run("run", "-m", model, "-p", "the", "-n", "6", "--temp", "0", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() != ""
    assert "tokens/s" in r.stderr and "prompt" in r.stderr


def test_prompt_from_stdin_equals_argument(model):
    a = run("run", "-m", model, "-p", "on the", "-n", "5", "--temp", "0", "-t", "1")
    b = run("run", "-m", model, "-p", "-", "-n", "5", "--temp", "0", "-t", "1", stdin="on the")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def test_info(model):
    r = run("info", model)
    assert r.returncode == 0, r.stderr
    for field in ("architecture:   llama", "parameters:", "quant mix:", "context length: 64", "tokenizer:",
                  "special tokens:", "chat template:"):
        assert field in r.stdout, field


def _corrupt(path, kind):
    raw = bytearray(open(path, "rb").read())
    if kind == "truncated":
        return bytes(raw[: len(raw) // 2])
    if kind == "magic":
        raw[:4] = b"GGML"
    elif kind == "version":
        raw[4:8] = struct.pack("<I", 9)
    return bytes(raw)


@pytest.mark.parametrize("kind, needle", [("truncated", "truncated"), ("magic", "not a GGUF file"),
                                          ("version", "unsupported GGUF version")])
def test_corrupt_model_one_line(model, tmp_path, kind, needle):
    bad = tmp_path / f"{kind}.gguf"
    bad.write_bytes(_corrupt(model, kind))
    one_line_error(run("run", "-m", str(bad), "-p", "hi", "-n", "2"), needle)
    one_line_error(run("info", str(bad)), needle)


def test_missing_model_one_line(tmp_path):
    one_line_error(run("run", "-m", str(tmp_path / "nope.gguf"), "-p", "hi"), "not found")


def test_unsupported_architecture_one_line(tmp_path):
    from gguf import GGUFWriter
    import numpy as np
    p = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(p), "mamba9")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    one_line_error(run("run", "-m", str(p), "-p", "hi"), "architecture 'mamba9' is not supported")


def test_prompt_longer_than_context_one_line(model):
    one_line_error(run("run", "-m", model, "-p", "the " * 200, "-n", "2", "-c", "32"), "context")


def test_ngl_without_gpu_warns_once_and_runs(model):
    r = run("run", "-m", model, "-p", "the", "-n", "3", "--temp", "0", "-t", "1", "-ngl", "99")
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln.lower()]
    assert len(warnings) == 1, r.stderr
    assert r.stdout.strip() != ""
