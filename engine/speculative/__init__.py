"""Speculative decoding: proposers (MTP head, draft model, n-gram) apart from the one verifier."""
from __future__ import annotations

from llamba.errors import LlambaError

SPEC_TYPES = ("auto", "mtp", "draft", "ngram", "none")


def make_proposer(llm, spec: str = "none", draft_max: int = 3, draft_p_min: float = 0.0, draft_model=None):
    """The proposer for `spec`, or None for plain decoding."""
    if spec in (None, "none"):
        return None
    if spec not in SPEC_TYPES:
        raise LlambaError(f"unknown speculative type '{spec}' (choose from {', '.join(SPEC_TYPES)})")
    raise LlambaError(f"speculative type '{spec}' is not available yet in this llamba")
