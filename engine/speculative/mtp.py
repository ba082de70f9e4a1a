"""MTP proposer: the model's own nextn head drafts (docs/architectures.md, "MTP").

The MTP block has its own KV cache, filled for every position the trunk keeps ("catch-up"): row p pairs
token p with the trunk's post-norm hidden of position p-1 (`pending_h` carries it between calls; zeros at 0).
"""
from __future__ import annotations

import numpy as np

from llamba.errors import LlambaError
from llamba.sampling import draft_top


class MTPProposer:
    kind = "mtp"
    needs_hidden = True
    takes_next_id = True  # accepted() can also draft the next step's first token (see there)

    def __init__(self, model, draft_max: int = 3, p_min: float = 0.0):
        mtp = getattr(model, "mtp", None)
        if mtp is None:
            raise LlambaError("this model has no MTP (nextn) layers, so --spec mtp cannot be used; "
                              "use --spec ngram, --draft-model PATH or --spec none")
        self.mtp = mtp
        self.draft_max = int(draft_max)
        self.p_min = float(p_min)
        self.zeros = np.zeros((1, model.config.n_embd), dtype=np.float32)
        self.pending_h = self.zeros
        self.h_pos = -1  # position whose trunk hidden pending_h is
        self.pre = None  # (position, token, logits, hidden) of a first draft computed by accepted()

    def can_resume(self, keep: int) -> bool:
        return keep == 0 or (self.h_pos == keep - 1 and self.mtp.n_past >= keep)

    def begin(self, session, keep: int):
        """Catch-up on the prompt body the trunk just evaluated (positions keep..n_past-1)."""
        n = session.model.n_past
        self.pre = None
        self.mtp.truncate(min(keep, self.mtp.n_past))
        if keep == 0:
            self.pending_h, self.h_pos = self.zeros, -1
        if n > keep:
            hid = session.model.hidden  # (n - keep, n_embd)
            self.mtp.forward(session.tokens[keep:n], np.concatenate([self.pending_h, hid[:-1]]), logits="none")
            self.pending_h, self.h_pos = hid[-1:].copy(), n - 1

    def draft(self, session, id_last: int, n_max: int) -> list[int]:
        mtp = self.mtp
        n_past = session.model.n_past
        out: list[int] = []
        h, tok = self.pending_h, id_last
        pre, self.pre = self.pre, None
        first = None
        if pre is not None and pre[0] == n_past and pre[1] == id_last and mtp.n_past == n_past + 1:
            first = pre[2], pre[3]
        elif mtp.n_past > n_past:
            mtp.truncate(n_past)
        for i in range(n_max):
            if i == 0 and first is not None:
                lg, hid = first
            else:
                lg, hid = mtp.forward([tok], h, logits="last", gemm=False)[-1], None
            t, p = draft_top(lg, 10)
            if p < self.p_min:
                break
            out.append(t)
            h, tok = (mtp.hidden if hid is None else hid), t
        mtp.truncate(n_past)  # draft rows are rewritten by the catch-up after verification
        return out

    def accepted(self, session, committed: list[int], verify_hidden, k: int, next_id: int | None = None):
        """Catch-up on the accepted prefix [id_last, d_1..d_k] with hiddens [pending_h, verify_h[0..k-1]].

        With next_id (the token the verifier sampled after them, which the next step drafts from), the same batch
        also takes the row [next_id, verify_h[k]]: exactly the next draft()'s first forward (batches are
        row-exact), so its logits are kept for it and one pass over the MTP weights per step is saved."""
        hs = np.concatenate([self.pending_h, verify_hidden[:k]])
        self.pre = None
        if next_id is None:
            self.mtp.forward(committed, hs, logits="none", gemm=False)
        else:
            lg = self.mtp.forward(list(committed) + [int(next_id)], np.concatenate([hs, verify_hidden[k:k + 1]]),
                                  logits="last", gemm=False)
            self.pre = (session.model.n_past, int(next_id), lg[-1], self.mtp.hidden)
        self.pending_h = verify_hidden[k:k + 1].copy()
        self.h_pos = session.model.n_past - 1
