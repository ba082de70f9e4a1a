"""Speculative decoding: proposers (MTP head, draft model, n-gram) apart from the one verifier
(`verifier.speculative_generate`). Every proposer has: kind, draft_max, needs_hidden, can_resume(keep),
begin(session, keep), draft(session, id_last, n_max) -> tokens, accepted(session, committed, hidden, k)."""
from __future__ import annotations

from llamba.errors import LlambaError

SPEC_TYPES = ("auto", "mtp", "draft", "ngram", "none")


def make_proposer(llm, spec: str = "none", draft_max: int = 3, draft_p_min: float = 0.0, draft_model=None):
    """The proposer for `spec`, or None for plain decoding. auto = MTP when the model has nextn layers,
    else the draft model when one is given, else none."""
    if spec is None:
        spec = "none"
    if spec not in SPEC_TYPES:
        raise LlambaError(f"unknown speculative type '{spec}' (choose from {', '.join(SPEC_TYPES)})")
    if draft_max is None or int(draft_max) < 1:
        if spec == "auto":
            return None
        raise LlambaError(f"--draft-max must be at least 1 (got {draft_max})")
    model = llm.model
    if spec == "auto":
        if getattr(model, "mtp", None) is not None:
            spec = "mtp"
        elif draft_model:
            spec = "draft"
        else:
            return None
    if spec == "none":
        return None
    if spec == "mtp":
        from llamba.speculative.mtp import MTPProposer
        return MTPProposer(model, draft_max, draft_p_min)
    if spec == "ngram":
        from llamba.speculative.ngram import NgramProposer
        return NgramProposer(draft_max)
    if not draft_model:
        raise LlambaError("--spec draft needs --draft-model PATH (a smaller GGUF with the same vocabulary)")
    from llamba.speculative.draft_model import DraftModelProposer
    return DraftModelProposer(llm, draft_model, draft_max, draft_p_min)
