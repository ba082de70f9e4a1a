"""Structure checks over the source tree (syntax trees only: nothing is imported or run).

`Llama` (engine/llama.py) is the engine API; every other module -- the server, the CLI, the chat REPL, warmup,
the benchmarks -- uses it through public names only (issue 15). The check:

1. The private members of class `Llama` are collected from llama.py's syntax tree: every `def _name` (methods,
   properties) and class-level `_name = ...` in its body, and every `self._name = ...` / `cls._name = ...`
   assigned in its methods. Dunders (`__init__`, ...) are not private members.
2. In every other module under engine/, kernels/ and bench/, an attribute access `X._name` (read, write, call,
   delete) whose `_name` is in that set is a violation unless the receiver `X` is the module's own object:
   - `X` is `self` or `cls` (a class reaching its own members) -- except inside a class that derives from
     `Llama`, whose `self._name` is Llama's;
   - or the module itself defines a member of that name (a `def _name`, a class-level `_name =`, or a
     `self._name =`, on any of its classes), and `X` is not spelled like a Llama (a receiver whose last name is
     `llm`, `llama` or `Llama`). This is what keeps, e.g., a server class's own `_n_ctx` method or a
     tokenizer's own `_scores` from counting: the name is the same, the object is not a Llama.
   `getattr` / `setattr` / `hasattr` / `delattr` with a constant private name from the set count as access too.
3. No module imports a private (underscore) name from llamba.llama: module-level helpers there are not API.

Tests are not scanned (a test may look inside the object it tests)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA_PY = REPO / "engine" / "llama.py"
SCANNED = ("engine", "kernels", "bench")
LLAMA_NAMES = {"llm", "llama", "Llama"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _class_members(cls: ast.ClassDef) -> set[str]:
    """Private names a class defines: defs and assignments in its body, self./cls. assignments in its methods."""
    out = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(node.name):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out |= {t.id for t in targets if isinstance(t, ast.Name) and _is_private(t.id)}
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_private(node.attr) and \
                isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            out.add(node.attr)
    return out


def llama_privates() -> set[str]:
    tree = ast.parse(LLAMA_PY.read_text(encoding="utf-8"))
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Llama"]
    assert len(classes) == 1, "engine/llama.py defines class Llama once"
    return _class_members(classes[0])


def _last_name(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        return expr.attr
    if isinstance(expr, ast.Call):
        return _last_name(expr.func)
    return None


def _derives_from_llama(cls: ast.ClassDef) -> bool:
    return any(_last_name(b) == "Llama" for b in cls.bases)


def violations(path: Path, privates: set[str]) -> list[str]:
    """`path:line: text` of each access to a private Llama member (and private import from llamba.llama)."""
    src = path.read_text(encoding="utf-8")
    tree = ast.parse(src, filename=str(path))
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            own |= _class_members(node)
    rel = path.relative_to(REPO)
    out = []

    def check(receiver: ast.expr, name: str, node: ast.AST, in_llama_subclass: bool):
        if name not in privates:
            return
        last = _last_name(receiver)
        if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
            if not in_llama_subclass:
                return
        elif name in own and last not in LLAMA_NAMES:
            return
        out.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")

    def visit(node: ast.AST, in_llama_subclass: bool):
        if isinstance(node, ast.ClassDef):
            in_llama_subclass = _derives_from_llama(node)
        if isinstance(node, ast.Attribute):
            check(node.value, node.attr, node, in_llama_subclass)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2 and \
                isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            check(node.args[0], node.args[1].value, node, in_llama_subclass)
        elif isinstance(node, ast.ImportFrom) and (node.module == "llamba.llama" or
                                                   (node.level and node.module == "llama")):
            for a in node.names:
                if _is_private(a.name):
                    out.append(f"{rel}:{node.lineno}: imports {a.name} from llamba.llama")
        for child in ast.iter_child_nodes(node):
            visit(child, in_llama_subclass)

    visit(tree, False)
    return out


def scanned_modules() -> list[Path]:
    files = []
    for d in SCANNED:
        files += [p for p in sorted((REPO / d).rglob("*.py")) if p != LLAMA_PY and "__pycache__" not in p.parts]
    return files


def test_llama_privates_found():
    """The rule has something to check against: the collection sees Llama's private members."""
    p = llama_privates()
    assert {"_need_model", "_n_ctx"} <= p
    assert "__init__" not in p


def test_the_rule_catches_and_spares(tmp_path):
    """The rule on small examples: a Llama private through any receiver is caught (also via getattr and a Llama
    subclass's self); a class's own member of the same name is not."""
    privates = {"_need_model", "_n_ctx", "_scores"}
    bad = tmp_path / "bad.py"
    bad.write_text("def f(llm, x):\n"
                   "    llm._need_model()\n"
                   "    getattr(x, '_n_ctx')\n"
                   "class L(Llama):\n"
                   "    def g(self):\n"
                   "        return self._scores\n"
                   "from llamba.llama import _usage\n")
    good = tmp_path / "good.py"
    good.write_text("class S:\n"
                    "    def _n_ctx(self):\n"
                    "        return 1\n"
                    "    def __init__(self, tok):\n"
                    "        self._scores = None\n"
                    "        tok._scores\n"
                    "        self._n_ctx()\n"
                    "        llm = tok\n"
                    "        llm.n_ctx()\n")
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        assert len(violations(bad, privates)) == 4
        assert violations(good, privates) == []
        good.write_text(good.read_text() + "        llm._n_ctx\n")
        assert len(violations(good, privates)) == 1  # spelled like a Llama: the same name is Llama's
    finally:
        REPO = saved


def test_no_module_reaches_into_llama():
    """No module under engine/, kernels/ or bench/ (other than engine/llama.py) uses a private member of a
    `Llama` object or imports a private name of llamba.llama: front ends use the public API."""
    privates = llama_privates()
    found = [v for p in scanned_modules() for v in violations(p, privates)]
    assert not found, "private Llama members used outside engine/llama.py:\n" + "\n".join(found)
