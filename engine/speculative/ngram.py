"""N-gram prompt-lookup proposer: find the most recent earlier occurrence of the last n tokens of the history
(n from `n_max_match` down to `n_min_match`) and propose the tokens that followed it."""
from __future__ import annotations


class NgramProposer:
    kind = "ngram"
    needs_hidden = False

    def __init__(self, draft_max: int = 3, n_max_match: int = 4, n_min_match: int = 2):
        self.draft_max = int(draft_max)
        self.n_max_match = n_max_match
        self.n_min_match = n_min_match

    def can_resume(self, keep: int) -> bool:
        return True

    def begin(self, session, keep: int):
        pass

    def draft(self, session, id_last: int, n_max: int) -> list[int]:
        hist = session.tokens + [id_last]
        L = len(hist)
        for n in range(min(self.n_max_match, L - 1), self.n_min_match - 1, -1):
            key = hist[L - n:]
            # most recent earlier match whose continuation exists
            for s in range(L - n - 1, -1, -1):
                if hist[s:s + n] == key:
                    cont = hist[s + n:s + n + n_max]
                    if cont:
                        return [int(t) for t in cont]
                    break
        return []

    def accepted(self, session, committed, verify_hidden, k: int):
        pass
