"""Compile-time dispatch on a quant type: ``by_kind(table)`` turns a table {kind: intrinsic} (built from the type
registry, ``llamba.kernels.traits``) into one intrinsic ``f(kind, *args)`` that expands, where it is compiled, to
``table[kind](*args)``. ``kind`` must be a compile-time constant there (a closure constant of a per-type kernel, or
a literal): the kernels stay specialised per type as the if-ladders they replace were after Numba's branch pruning,
with no list of types spelled out in the kernel code.

``by_kind(table, keys=2)`` dispatches on two constants (``table[(kind, nt)]``). ``call_by_kind(table)`` does the same
for a table of ``@njit`` functions (called, not inlined).
"""
from __future__ import annotations

import inspect

from numba.core import errors, types
from numba.extending import intrinsic, overload


def _literal(name, ty):
    if isinstance(ty, types.IntegerLiteral):
        return ty.literal_value
    if isinstance(ty, types.BooleanLiteral):
        return ty.literal_value
    raise errors.TypingError(f"{name}: the dispatch key must be a compile-time constant, got {ty}")


def by_kind(table: dict, keys: int = 1, name: str = "by_kind"):
    """intrinsic(k_1, .., k_keys, *args) -> table[k_1 if keys == 1 else (k_1, .., k_keys)](*args) (an intrinsic)."""
    first = next(iter(table.values()))
    params = list(inspect.signature(first._defn).parameters)[1:]  # drop typingctx
    kparams = [f"_k{i}" for i in range(keys)]

    def typer(typingctx, *tys):
        ks = tuple(_literal(name, t) for t in tys[:keys])
        inner = table.get(ks[0] if keys == 1 else ks)
        if inner is None:
            raise errors.TypingError(f"{name}: no kernel for {ks}")
        sig, cg = inner._defn(typingctx, *tys[keys:])

        def codegen(context, builder, s, args):
            return cg(context, builder, sig, args[keys:])
        return sig.return_type(*tys), codegen

    src = (f"def {name}(typingctx, {', '.join(kparams + params)}):\n"
           f"    return typer(typingctx, {', '.join(kparams + params)})\n")
    ns = {"typer": typer}
    exec(src, ns)  # an explicit parameter list: Numba's intrinsics take no *args
    return intrinsic(prefer_literal=True)(ns[name])


def call_by_kind(table: dict, name: str = "call_by_kind"):
    """f(kind, *args) -> table[kind](*args) for a table of @njit functions (``kind`` a compile-time constant)."""
    first = next(iter(table.values()))
    params = list(inspect.signature(first.py_func).parameters)

    def stub(*a):  # replaced by the overload below in compiled code
        raise NotImplementedError(name)

    src = (f"def {name}(kind, {', '.join(params)}):\n    return stub(kind, {', '.join(params)})\n")
    ns = {"stub": stub}
    exec(src, ns)
    fn = ns[name]

    def ov(kind, *args):
        fn_k = table.get(_literal(name, kind))
        if fn_k is None:
            raise errors.TypingError(f"{name}: no kernel for {kind}")
        isrc = (f"def impl(kind, {', '.join(params)}):\n    return fn_k({', '.join(params)})\n")
        ins = {"fn_k": fn_k}
        exec(isrc, ins)
        return ins["impl"]

    osrc = (f"def ov_{name}(kind, {', '.join(params)}):\n    return ov(kind, {', '.join(params)})\n")
    ons = {"ov": ov}
    exec(osrc, ons)
    overload(fn, prefer_literal=True)(ons[f"ov_{name}"])
    return fn
