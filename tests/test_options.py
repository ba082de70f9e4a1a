"""Engine options (llamba.options): one frozen object per Llama, passed down to the model, its Linears and its KV
pool, so that two models in one process follow their own settings; the environment gives only the defaults, and
llamba.options is the one module of the package that reads it."""
from __future__ import annotations

import ast
import pathlib
import re

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from llamba import Llama
from llamba.errors import LlambaError
from llamba.layers import Linear
from llamba.options import VARIABLES, Options
from tiny_models import write_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV_MODULE = ROOT / "engine" / "options.py"


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory):
    p = tmp_path_factory.mktemp("options") / "llama-q8_0.gguf"
    write_model(p, "llama", qtype=QT.Q8_0, n_vocab=301, n_embd=64, n_ff=160, n_head=4, n_head_kv=2, seed=5)
    return str(p)


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("LLAMBA_KV_F32", "LLAMBA_REPACK", "LLAMBA_GEMM_MIN_BATCH"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _linears(llm):
    return [m for m in vars(llm.model.blocks[0].ffn).values() if isinstance(m, Linear)]


TOKS = [3, 17, 250, 300, 41, 7, 99, 123, 5, 64]


def test_two_models_different_kv_types(q8_model, clean_env):
    """f16 and f32 KV caches side by side in one process: each model's pools (the default sequence's and the
    batching engine's) have its own element type, and the logits are the same (same fp16-rounded values)."""
    a = Llama(q8_model, n_ctx=64, verbose=False)
    b = Llama(q8_model, n_ctx=64, verbose=False, kv_type="f32")
    assert a.options.kv_type == "f16" and b.options.kv_type == "f32"
    assert a.model.options is a.options and b.model.options is b.options
    assert all(x.dtype == np.uint16 for x in list(a.model.kv.k.values()) + list(a.model.kv.v.values()))
    assert all(x.dtype == np.float32 for x in list(b.model.kv.k.values()) + list(b.model.kv.v.values()))
    assert a.model.new_pool(32, 16).k[0].dtype == np.uint16 and b.model.new_pool(32, 16).k[0].dtype == np.float32
    la, lb = a.eval_logits(TOKS), b.eval_logits(TOKS)
    assert np.array_equal(la, lb)
    for _ in range(3):  # decode steps against the two caches
        t = int(np.argmax(la[-1]))
        la, lb = a.eval_logits([t]), b.eval_logits([t])
        assert np.array_equal(la, lb)
    ga = a.create_completion("ab", max_tokens=4, temperature=0)["choices"][0]["text"]
    gb = b.create_completion("ab", max_tokens=4, temperature=0)["choices"][0]["text"]
    assert ga == gb


def test_two_models_repack_on_and_off(q8_model, clean_env):
    a = Llama(q8_model, n_ctx=32, verbose=False)
    b = Llama(q8_model, n_ctx=32, verbose=False, repack=False)
    assert all(lin.wp is not None for lin in _linears(a)) and all(lin.wp is None for lin in _linears(b))
    assert np.array_equal(a.eval_logits(TOKS), b.eval_logits(TOKS))


def test_gemm_min_batch_per_model(q8_model, clean_env, monkeypatch):
    """A prompt batch of 10 rows takes the BLAS path in the model with gemm_min_batch=4 only."""
    a = Llama(q8_model, n_ctx=32, verbose=False)
    b = Llama(q8_model, n_ctx=32, verbose=False, gemm_min_batch=4)
    assert a.options.gemm_min_batch == 0 and b.options.gemm_min_batch == 4
    calls = []
    orig = Linear.gemm

    def spy(self, *args, **kw):
        calls.append(self)
        return orig(self, *args, **kw)
    monkeypatch.setattr(Linear, "gemm", spy)
    a.model.reset()
    a.model.forward(TOKS, logits="all")
    assert not calls
    b.model.reset()
    b.model.forward(TOKS, logits="all")
    assert calls
    calls.clear()
    b.model.forward([1, 2, 3], logits="all")  # below the threshold: the quantized path
    assert not calls


def test_environment_gives_the_defaults(q8_model, clean_env):
    clean_env.setenv("LLAMBA_KV_F32", "1")
    clean_env.setenv("LLAMBA_REPACK", "off")
    clean_env.setenv("LLAMBA_GEMM_MIN_BATCH", "256")
    assert Options.from_env() == Options(kv_type="f32", repack=False, gemm_min_batch=256)
    a = Llama(q8_model, n_ctx=32, verbose=False)
    assert a.options == Options(kv_type="f32", repack=False, gemm_min_batch=256)
    assert a.model.kv.k[0].dtype == np.float32 and all(lin.wp is None for lin in _linears(a))
    # keywords win over the environment; an explicit Options object is not mixed with it
    b = Llama(q8_model, n_ctx=32, verbose=False, kv_type="f16", repack=True)
    assert b.options == Options(kv_type="f16", repack=True, gemm_min_batch=256)
    assert b.model.kv.k[0].dtype == np.uint16 and all(lin.wp is not None for lin in _linears(b))
    c = Llama(q8_model, n_ctx=32, verbose=False, options=Options())
    assert c.options == Options() and c.model.kv.k[0].dtype == np.uint16
    # read when an object is made, not at import: unsetting takes effect for the next model
    for k in ("LLAMBA_KV_F32", "LLAMBA_REPACK", "LLAMBA_GEMM_MIN_BATCH"):
        clean_env.delenv(k)
    assert Options.from_env() == Options()


def test_option_values_checked(q8_model, clean_env):
    with pytest.raises(LlambaError, match="kv_type"):
        Llama(q8_model, n_ctx=32, verbose=False, kv_type="q8_0")
    with pytest.raises(LlambaError, match="gemm_min_batch"):
        Options(gemm_min_batch=-1)
    with pytest.raises(LlambaError, match="repack"):
        Options(repack="no")
    with pytest.raises(LlambaError, match="unknown option"):
        Options().with_(kv_dtype="f32")
    clean_env.setenv("LLAMBA_GEMM_MIN_BATCH", "lots")
    with pytest.raises(LlambaError, match="LLAMBA_GEMM_MIN_BATCH"):
        Options.from_env()
    assert Options.from_env({"LLAMBA_KV_F32": "yes"}).kv_type == "f32"
    o = Options()
    with pytest.raises(AttributeError):
        o.kv_type = "f32"  # frozen


def test_cli_flags_become_options():
    from llamba.cli import _gpu_kwargs, build_parser
    a = build_parser().parse_args(["run", "-p", "x", "--kv-type", "f32", "--no-repack", "--gemm-min-batch", "64"])
    kw = _gpu_kwargs(a)
    assert (kw["kv_type"], kw["repack"], kw["gemm_min_batch"]) == ("f32", False, 64)
    a = build_parser().parse_args(["run", "-p", "x"])
    assert not {"kv_type", "repack", "gemm_min_batch"} & set(_gpu_kwargs(a))  # unset: the environment's defaults


def _env_access(path: pathlib.Path) -> list[str]:
    """`os.environ` / `os.getenv` / `os.putenv` / `from os import environ, getenv` in one module."""
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv", "getenvb", "putenv",
                                                              "unsetenv") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno} os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and \
                any(a.name in ("environ", "getenv", "putenv") for a in node.names):
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno} from os import ...")
    return bad


def test_environment_read_in_one_module_only():
    files = sorted(p for d in ("engine", "kernels") for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    assert ENV_MODULE in files and _env_access(ENV_MODULE)
    bad = [hit for p in files if p != ENV_MODULE for hit in _env_access(p)]
    assert not bad, "environment variables are read in llamba.options only (add an accessor there): " + str(bad)


def test_every_variable_documented_and_every_env_call_declared():
    doc = (ROOT / "docs" / "environment.md").read_text()
    missing = [v for v in VARIABLES if f"`{v}`" not in doc]
    assert not missing, f"docs/environment.md does not document {missing}"
    # every llamba.options.env("NAME") in the package names a declared variable (env() raises KeyError otherwise)
    for d in ("engine", "kernels"):
        for p in (ROOT / d).rglob("*.py"):
            for name in re.findall(r"\benv\(\s*\"([A-Z_]+)\"", p.read_text()):
                assert name in VARIABLES, (p, name)
