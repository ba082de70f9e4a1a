"""The one verifier every proposer shares (llama.cpp's `draft-mtp` loop, steps 4-8, in
docs/architectures.md).

Per step: the proposer drafts up to n_max tokens after `id_last`; the target evaluates [id_last, d_1..d_n] in ONE
row-exact batch (logits for every row, per-token recurrent snapshots); the target's own sampler picks row by row
and the longest prefix equal to the draft is accepted, plus the correction or bonus token; then the KV caches are
truncated and the recurrent state restored to the snapshot after the last accepted row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field



@dataclass
class SpecStats:
    kind: str = ""
    draft_max: int = 0
    n_drafted: int = 0  # draft tokens proposed
    n_accepted: int = 0  # draft tokens accepted
    n_steps: int = 0  # verify steps
    n_steps_with_draft: int = 0
    accepted_at: list = field(default_factory=list)  # accepted_at[i]: steps that accepted >= i+1 drafts
    drafted_at: list = field(default_factory=list)  # drafted_at[i]: steps that drafted >= i+1 tokens
    t_draft: float = 0.0
    t_verify: float = 0.0
    steps: list = field(default_factory=list)  # (n_drafted, n_accepted) per verify step

    @property
    def acceptance(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    @property
    def mean_accepted_len(self) -> float:
        """tokens committed per verify step (1 + accepted drafts), llama.cpp's '#mean acc len'."""
        return 1.0 + self.n_accepted / self.n_steps if self.n_steps else 0.0

    def per_position(self) -> list[float]:
        """For draft position i: of the steps that drafted a token there, the fraction that accepted it."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    def record(self, n_draft: int, k: int):
        self.steps.append((n_draft, k))
        self.n_steps += 1
        self.n_drafted += n_draft
        self.n_accepted += k
        if n_draft:
            self.n_steps_with_draft += 1
        while len(self.drafted_at) < n_draft:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(n_draft):
            self.drafted_at[i] += 1
            if i < k:
                self.accepted_at[i] += 1

    def as_dict(self) -> dict:
        return {"kind": self.kind, "draft_max": self.draft_max, "drafted": self.n_drafted,
                "accepted": self.n_accepted, "acceptance": self.acceptance, "verify_steps": self.n_steps,
                "mean_accepted_len": self.mean_accepted_len, "acceptance_per_position": self.per_position(),
                "t_draft_s": self.t_draft, "t_verify_s": self.t_verify}

    def summary(self) -> str:
        pos = ", ".join(f"{p:.3f}" for p in self.per_position())
        return (f"speculative ({self.kind}, draft-max {self.draft_max}): drafted {self.n_drafted}, accepted "
                f"{self.n_accepted} ({100 * self.acceptance:.1f} %), acceptance per position ({pos}), "
                f"mean accepted length {self.mean_accepted_len:.2f} per verify step ({self.n_steps} steps)")


def draft_limit(draft_max: int, room: int, budget: int, n_gen: int) -> int:
    """Tokens to draft this step: draft_max, clipped by the context left and the generation budget."""
    return max(0, min(draft_max, room, budget - n_gen - 1))


def speculative_generate(session, prompt, sampler, budget, stats, is_eog, proposer, t0, on_logits=None):
    """Generator of token ids; the prompt body (all but the last token) is already in the cache. `on_logits(row)`:
    called before each token is yielded with the verify row it was sampled from."""
    model = session.model
    spec = SpecStats(kind=proposer.kind, draft_max=proposer.draft_max)
    stats.spec = spec
    need_h = proposer.needs_hidden
    id_last = int(prompt[-1])
    n_gen = 0
    t_first = None
    while n_gen < budget:
        n_past = model.n_past
        room = model.n_ctx - n_past - 1  # the verify batch is 1 + n_draft tokens
        if room < 0:
            break
        n_max = draft_limit(proposer.draft_max, room, budget, n_gen)
        td = time.perf_counter()
        draft = proposer.draft(session, id_last, n_max) if n_max > 0 else []
        cons = getattr(sampler, "constraint", None)
        if draft and cons is not None:  # a draft token the grammar forbids ends the draft there
            draft = draft[:cons.valid_prefix(draft)]
        tv = time.perf_counter()
        spec.t_draft += tv - td
        batch = [id_last] + draft
        kw = {"snapshots": True} if _has_snapshots(model) else {}
        logits = model.forward(batch, logits="all", gemm=False, keep_hidden=need_h, **kw)
        hidden = model.hidden if need_h else None
        ids = sampler.sample_and_accept_n(logits, draft)
        k = len(ids) - 1
        spec.t_verify += time.perf_counter() - tv
        spec.record(len(draft), k)
        session.rollback(n_past + 1 + k)
        more = (n_gen + len(ids) < budget and model.n_past < model.n_ctx
                and not (is_eog and any(is_eog(t) for t in ids)))
        if more and getattr(proposer, "takes_next_id", False):  # the next step drafts after ids[-1]
            proposer.accepted(session, batch[:k + 1], hidden, k, next_id=ids[-1])
        else:
            proposer.accepted(session, batch[:k + 1], hidden, k)
        if t_first is None:
            t_first = time.perf_counter()
            stats.t_prompt = stats.t_first = t_first - t0
            from llamba.kernels._jit import release_llvm_pages_after_first_token
            release_llvm_pages_after_first_token()
        for j, t in enumerate(ids):
            n_gen += 1
            stats.n_gen = n_gen
            stats.t_gen = time.perf_counter() - t_first
            if on_logits is not None:
                on_logits(logits[j])
            yield t
            if (is_eog and is_eog(t)) or n_gen >= budget:
                return
        id_last = ids[-1]


def _has_snapshots(model) -> bool:
    return hasattr(model, "rec") and bool(model.rec)
