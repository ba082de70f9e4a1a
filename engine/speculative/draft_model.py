"""Draft-model proposer: a smaller GGUF with the same vocabulary drafts greedily (top-k 10, take the top),
keeping its own cache in step with the target's tokens (llama.cpp's `draft-simple`)."""
from __future__ import annotations

from llamba.errors import LlambaError
from llamba.generate import Session, common_prefix
from llamba.sampling import draft_top


class DraftModelProposer:
    kind = "draft"
    needs_hidden = False

    def __init__(self, target_llm, path: str, draft_max: int = 3, p_min: float = 0.0):
        from llamba.gguf import GGUFFile
        from llamba.models import load_model
        from llamba.tokenizer import Tokenizer
        gf = GGUFFile(path)
        tok = Tokenizer.from_metadata(gf.metadata)
        t = target_llm.tokenizer
        if tok.n_vocab != t.n_vocab or tok.tokens[: min(256, tok.n_vocab)] != t.tokens[: min(256, t.n_vocab)]:
            raise LlambaError(f"{path}: the draft model's vocabulary ({tok.n_vocab} tokens) differs from the "
                              f"target's ({t.n_vocab}); use a draft model from the same family")
        self.session = Session(load_model(gf, target_llm.n_ctx(), options=getattr(target_llm, "options", None),
                                          load_mtp=False))  # the target's engine options (llamba.options)
        self.draft_max = int(draft_max)
        self.p_min = float(p_min)

    def can_resume(self, keep: int) -> bool:
        return True

    def begin(self, session, keep: int):
        self._sync(session.tokens)

    def _sync(self, tokens: list[int]):
        s = self.session
        keep = common_prefix(s.tokens, tokens)
        if keep < len(s.tokens):
            s.rollback(keep if s.model.can_truncate(keep) else 0)
        rest = tokens[len(s.tokens):]
        if rest:
            s.eval(rest, logits="none")

    def draft(self, session, id_last: int, n_max: int) -> list[int]:
        self._sync(session.tokens)
        s = self.session
        n0 = len(s.tokens)
        out: list[int] = []
        tok = id_last
        for _ in range(n_max):
            t, p = draft_top(s.eval([tok], logits="last", gemm=False)[-1], 10)
            if p < self.p_min:
                break
            out.append(t)
            tok = t
        if s.model.can_truncate(n0):
            s.rollback(n0)
        else:
            s.reset()
        return out

    def accepted(self, session, committed, verify_hidden, k: int):
        pass
