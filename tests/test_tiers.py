"""The two test tiers (see tests/conftest.py): modules skipped wholesale by the fast tier are slow as a whole, and
collecting the fast tier imports none of the heavy optional packages."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import SLOW_MODULES

TESTS = Path(__file__).resolve().parent


def _module_marks(path: Path) -> list[str]:
    """The source of every module-level `pytestmark = ...` value."""
    tree = ast.parse(path.read_text())
    return [ast.unparse(n.value) for n in tree.body if isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)]


def test_modules_left_out_of_the_fast_tier_are_slow_as_a_whole():
    """conftest does not import SLOW_MODULES for `-m "not slow"`: that must hide no fast test."""
    assert SLOW_MODULES
    for name in SLOW_MODULES:
        marks = _module_marks(TESTS / name)
        assert marks == ["pytest.mark.slow"], (name, marks)


def test_fast_collection_imports_no_heavy_package():
    code = ("import sys, pytest\n"
            "rc = pytest.main(['--collect-only', '-q', '-m', 'not slow', '-p', 'no:cacheprovider', sys.argv[1]])\n"
            "heavy = sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules)\n"
            "print('HEAVY', heavy, 'RC', int(rc))\n")
    r = subprocess.run([sys.executable, "-c", code, str(TESTS)], capture_output=True, text=True, cwd=TESTS.parent,
                       timeout=600)
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("HEAVY")]
    assert last == ["HEAVY [] RC 0"], r.stdout[-2000:] + r.stderr[-2000:]
