"""Sequence state as objects: one KV pool per model instance, handed out in blocks, and one `SeqCache` per
sequence (its block table, position, tokens, recurrent states and their rollback snapshots, the MTP head's view).

The model holds weights only and runs `forward_batch` over the sequences it is handed (llamba.models.base).

KV memory (paged, as vLLM's): per attention layer one array (n_kv_head, n_blocks * block_size, head_dim) of fp16
bits; block b holds slots b*bs .. b*bs+bs-1 in every layer. A sequence's position p lives in slot
table[p // bs] * bs + p % bs, so a sequence takes blocks as it grows and gives them back when it is truncated or
released: short requests do not reserve a whole context, and one `-c` budget is shared by all sequences. The
arrays come from np.zeros (calloc: pages are mapped when first written), so untouched blocks cost no memory.
Why blocks and not llama.cpp's per-token cells: the attention kernel reads whole runs of slots per block (same
arithmetic, see kernels/ops.attention_paged), the free list is per block, and a single-sequence model is simply
the one-block case (bs = n_ctx). Offloaded layers (llamba.offload) keep their pool arrays on their device.

Prefix sharing (as vLLM's automatic prefix caching): a new sequence whose prompt begins with what an idle sequence
holds takes that sequence's full blocks by reference (`SeqCache.fork`; the pool counts references) and a copy of
the partial block, so both keep their cache. A shared block is never written: a sequence writes only at positions
>= its n_past, the blocks it shares lie wholly below that, and `truncate` gives a sequence private copies of the
shared blocks at or after the position it goes back to before anything can be written there. Sequences with
recurrent state (DeltaNet) do not fork: that state is not per position.
"""
from __future__ import annotations

import numpy as np

from llamba.errors import ContextOverflowError, LlambaError
from llamba.kernels import ops as K


class KVExhaustedError(LlambaError):
    """The shared KV pool has no free block left for a sequence that needs one."""


class KVPool:
    """K and V slot arrays per attention layer, allocated in blocks of `block_size` slots.

    layers: il -> (n_head_kv, head_dim_k, head_dim_v). dtype: the arrays' element type, the model's
    `Options.kv_dtype` (llamba.options): uint16 fp16 bits (the default, like llama.cpp's F16 cache) or float32
    holding the same fp16-rounded values."""

    def __init__(self, layers: dict[int, tuple[int, int, int]], n_slots: int, block_size: int, dtype=K.KV_DTYPE):
        if block_size < 1 or n_slots < 1:
            raise LlambaError(f"a KV pool needs at least one slot and block (got {n_slots} slots, "
                              f"blocks of {block_size})")
        self.bs = int(block_size)
        self.n_blocks = -(-int(n_slots) // self.bs)
        self.n_slots = self.n_blocks * self.bs
        self.layers = dict(layers)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.float32)):
            raise LlambaError(f"a KV pool holds uint16 (fp16 bits) or float32 arrays, not {self.dtype}")
        self.k = {il: np.zeros((h, self.n_slots, dk), dtype=self.dtype) for il, (h, dk, dv) in layers.items()}
        self.v = {il: np.zeros((h, self.n_slots, dv), dtype=self.dtype) for il, (h, dk, dv) in layers.items()}
        self._free = list(range(self.n_blocks - 1, -1, -1))  # a stack: low block ids first
        self._ref = [0] * self.n_blocks  # sequences holding each block (more than one: a shared prefix)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k.values()) + sum(a.nbytes for a in self.v.values())

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVExhaustedError(f"the KV cache is full: {n} more blocks of {self.bs} tokens needed, "
                                   f"{len(self._free)} of {self.n_blocks} free; raise the context size (-c)")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def release(self, blocks: list[int]):
        """Drop one reference to each block; a block no sequence holds any more goes back to the free list."""
        for b in reversed(blocks):
            r = self._ref[b] - 1
            if r < 0:
                raise LlambaError(f"KV block {b} released more often than it was taken")
            self._ref[b] = r
            if r == 0:
                self._free.append(b)

    def share(self, blocks: list[int]):
        """One more reference to each block (a sequence that forks another's prefix)."""
        for b in blocks:
            if self._ref[b] < 1:
                raise LlambaError(f"KV block {b} is free: it cannot be shared")
            self._ref[b] += 1

    def refs(self, b: int) -> int:
        return self._ref[b]

    def copy_block(self, dst: int, src: int, n: int | None = None):
        """Copy the first n slots (all by default) of block src to block dst, in every layer."""
        bs = self.bs
        n = bs if n is None else n
        d0, s0 = dst * bs, src * bs
        for arrs in (self.k, self.v):
            for a in arrs.values():
                a[:, d0:d0 + n] = a[:, s0:s0 + n]


class SeqCache:
    """One sequence's cache: KV blocks in a shared pool (block table), `n_past` positions cached, the token ids
    in them, recurrent (DeltaNet) conv/ssm states with the snapshots of the last batch for rollback, and the MTP
    head's own position (`mtp`, a view sharing the block table).

    `truncate(n)` forgets positions >= n: KV is moving n back (and giving whole blocks back); recurrent state is
    restored from the snapshot after position n-1 (`can_truncate` says whether one is there)."""

    def __init__(self, pool: KVPool, n_ctx: int, rec_shapes: dict | None = None, mtp: bool = False):
        self.pool = pool
        self.n_ctx = int(n_ctx)  # most positions this sequence may hold
        self.blocks: list[int] = []
        self.table = np.zeros(max(1, -(-self.n_ctx // pool.bs)), dtype=np.int32)
        self.n_past = 0
        self.tokens: list[int] = []
        self.rec = {il: (np.zeros(cs, dtype=np.float32), np.zeros(ss, dtype=np.float32))
                    for il, (cs, ss) in (rec_shapes or {}).items()}
        self._snap = None  # (n_past before the batch, {il: state before}, {il: (conv_snaps, ssm_snaps)}, T)
        self.hidden = None  # post-norm hidden rows of the last forward (when asked for)
        self.mtp = MTPCache(self) if mtp else None

    @property
    def owner(self) -> "SeqCache":
        """The sequence whose blocks these positions use (itself; an MTP view answers its parent)."""
        return self

    # ---- KV blocks
    def check_room(self, n_tokens: int, start: int | None = None):
        p = self.n_past if start is None else start
        if p + n_tokens > self.n_ctx:
            raise ContextOverflowError(
                f"{p + n_tokens} tokens do not fit the context of {self.n_ctx} "
                f"({p} cached + {n_tokens} new); raise n_ctx (-c) or shorten the prompt")

    def reserve(self, n_pos: int):
        """Make sure positions < n_pos have slots (takes blocks from the pool)."""
        need = -(-n_pos // self.pool.bs) - len(self.blocks)
        if need > 0:
            if n_pos > self.n_ctx:
                self.check_room(n_pos - self.n_past)
            new = self.pool.alloc(need)
            self.table[len(self.blocks):len(self.blocks) + need] = new
            self.blocks.extend(new)

    def can_fork(self) -> bool:
        """Whether another sequence can share this one's prefix (fork): KV only, no recurrent state."""
        return not self.rec

    def fork(self, n: int) -> "SeqCache":
        """A new sequence holding this one's first n positions (1 <= n <= n_past): the full blocks among them
        shared, the last partial one copied into a block of its own (taken from the pool). This sequence keeps
        everything it holds."""
        if not self.can_fork():
            raise LlambaError("a sequence with recurrent state cannot share its prefix")
        if not 0 < n <= self.n_past:
            raise ValueError(f"cannot fork {n} positions of a sequence holding {self.n_past}")
        if self.mtp is not None and n > self.mtp.n_past:
            raise ValueError(f"cannot fork {n} positions: the MTP head holds {self.mtp.n_past}")
        pool = self.pool
        k, m = divmod(n, pool.bs)
        new = SeqCache(pool, self.n_ctx, None, mtp=self.mtp is not None)
        blocks = self.blocks[:k]
        if m:
            dst = pool.alloc(1)[0]
            pool.copy_block(dst, self.blocks[k], m)
        pool.share(blocks)
        new.blocks = blocks + ([dst] if m else [])
        new.table[:len(new.blocks)] = new.blocks
        new.n_past = n
        new.tokens = self.tokens[:n]
        if new.mtp is not None:
            new.mtp.n_past = n
        return new

    def _own_from(self, p: int):
        """Private copies of the shared blocks holding positions >= p (before anything is written there)."""
        pool = self.pool
        for i in range(p // pool.bs, len(self.blocks)):
            b = self.blocks[i]
            if pool.refs(b) > 1:
                nb = pool.alloc(1)[0]
                pool.copy_block(nb, b)
                pool.release([b])
                self.blocks[i] = nb
                self.table[i] = nb

    def blocks_needed(self, n_pos: int) -> int:
        return max(0, -(-n_pos // self.pool.bs) - len(self.blocks))

    def slots(self, p0: int, T: int) -> np.ndarray:
        p = np.arange(p0, p0 + T, dtype=np.int64)
        bs = self.pool.bs
        return self.table[p // bs].astype(np.int64) * bs + p % bs

    def _shrink(self, n_pos: int):
        """Give back blocks that hold no position < n_pos (nor one the MTP view still needs)."""
        if self.mtp is not None:
            n_pos = max(n_pos, self.mtp.n_past)
        keep = -(-n_pos // self.pool.bs)
        if keep < len(self.blocks):
            self.pool.release(self.blocks[keep:])
            del self.blocks[keep:]

    def release(self):
        """Give every block back and forget everything (the sequence can be reused from position 0)."""
        self.pool.release(self.blocks)
        self.blocks = []
        self.n_past = 0
        self.tokens = []
        self.hidden = None
        self._snap = None
        for cs, ss in self.rec.values():
            cs[...] = 0
            ss[...] = 0
        if self.mtp is not None:
            self.mtp.n_past = 0
            self.mtp.hidden = None

    # ---- rollback
    def can_truncate(self, n: int) -> bool:
        if n < 0 or n > self.n_past:
            return False
        if n == self.n_past or not self.rec or n == 0:
            return True
        s = self._snap
        return s is not None and s[0] <= n <= s[0] + s[3]

    def truncate(self, n: int):
        """Forget every position >= n (tokens too)."""
        if n < 0 or n > self.n_past:
            raise ValueError(f"cannot truncate to {n} with {self.n_past} positions cached")
        if n != self.n_past and self.rec:
            if n == 0:
                for cs, ss in self.rec.values():
                    cs[...] = 0
                    ss[...] = 0
            elif not self.can_truncate(n):
                s = self._snap
                raise ValueError(f"cannot roll the recurrent state back to {n}: snapshots cover "
                                 f"{'nothing' if s is None else f'{s[0]}..{s[0] + s[3]}'}")
            else:
                base, before, snaps, _ = self._snap
                for il, (cs, ss) in self.rec.items():
                    if n == base:
                        cs[...], ss[...] = before[il]
                    else:
                        cs[...] = snaps[il][0][n - base - 1]
                        ss[...] = snaps[il][1][n - base - 1]
            self._snap = None
        self.n_past = n
        del self.tokens[n:]
        if self.mtp is not None and self.mtp.n_past > n + 1:
            self.mtp.n_past = min(self.mtp.n_past, n)
        self._shrink(n)
        self._own_from(n if self.mtp is None else min(n, self.mtp.n_past))

    # ---- state copies (save_state / load_state, prefix copies between sequences)
    def kv_rows(self, il: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of positions 0..n-1 of layer il, as contiguous (Hkv, n, d) copies."""
        s = self.slots(0, n)
        return self.pool.k[il][:, s].copy(), self.pool.v[il][:, s].copy()

    def set_kv_rows(self, il: int, k: np.ndarray, v: np.ndarray):
        self._own_from(0)
        s = self.slots(0, k.shape[1])
        self.pool.k[il][:, s] = k
        self.pool.v[il][:, s] = v


class MTPCache:
    """The MTP head's position in a sequence: its KV layer lives in the same pool and block table, with its own
    `n_past` (the head's catch-up lags or leads the trunk by a row)."""

    def __init__(self, parent: SeqCache):
        self.parent = parent
        self.n_past = 0
        self.hidden = None

    @property
    def pool(self):
        return self.parent.pool

    @property
    def owner(self) -> SeqCache:
        return self.parent

    @property
    def table(self):
        return self.parent.table

    @property
    def n_ctx(self) -> int:
        return self.parent.n_ctx

    @property
    def rec(self):
        return {}

    def check_room(self, n_tokens: int, start: int | None = None):
        self.parent.check_room(n_tokens, self.n_past if start is None else start)

    def reserve(self, n_pos: int):
        self.parent.reserve(n_pos)

    def slots(self, p0: int, T: int) -> np.ndarray:
        return self.parent.slots(p0, T)

    def can_truncate(self, n: int) -> bool:
        return 0 <= n <= self.n_past

    def truncate(self, n: int):
        if n < 0 or n > self.n_past:
            raise ValueError(f"cannot truncate to {n} with {self.n_past} positions cached")
        self.n_past = n


class Batch:
    """The rows of one forward over several sequences: per sequence its token ids, placed after what it holds.

    pos (R,) absolute positions, row_seq (R,) the sequence of each row, slots (R,) cache slots, tables
    (n_seq, max_blocks) block tables, n_kv (n_seq,) positions cached after this batch, ranges [(r0, r1)] per
    sequence. Reserving the slots happens here, before any layer runs (all or nothing)."""

    def __init__(self, seqs: list, toks: list):
        self.seqs = seqs
        if not seqs:
            raise ValueError("a batch needs at least one sequence")
        pool = seqs[0].pool
        for s in seqs:
            if s.pool is not pool:
                raise ValueError("the sequences of one batch must share a KV pool")
        self.kv = pool
        self.bs = pool.bs
        lens = [len(t) for t in toks]
        for s, n in zip(seqs, lens):
            s.check_room(n)
        taken = []
        try:
            for s, n in zip(seqs, lens):
                before = len(s.owner.blocks)
                s.reserve(s.n_past + n)
                taken.append((s, before))
        except BaseException:
            for s, before in taken:  # all or nothing: blocks taken for this batch go back
                owner = s.owner
                if len(owner.blocks) > before:
                    pool.release(owner.blocks[before:])
                    del owner.blocks[before:]
            raise
        self.tokens = np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1) for t in toks]) \
            if toks else np.empty(0, np.int64)
        R = self.tokens.shape[0]
        self.ranges = []
        r = 0
        for n in lens:
            self.ranges.append((r, r + n))
            r += n
        self.pos = np.concatenate([np.arange(s.n_past, s.n_past + n, dtype=np.int64) for s, n in zip(seqs, lens)])
        self.row_seq = np.repeat(np.arange(len(seqs), dtype=np.int64), lens)
        self.slots = np.concatenate([s.slots(s.n_past, n) for s, n in zip(seqs, lens)]) if R else \
            np.empty(0, np.int64)
        nb = max(1, max(len(s.table) for s in seqs))
        self.tables = np.zeros((len(seqs), nb), dtype=np.int32)
        for i, s in enumerate(seqs):
            self.tables[i, :len(s.table)] = s.table
        self.n_kv = np.array([s.n_past + n for s, n in zip(seqs, lens)], dtype=np.int64)
        self.lens = lens

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    def commit(self):
        """After the forward: every sequence now holds its rows."""
        for s, n, (r0, r1) in zip(self.seqs, self.lens, self.ranges):
            s.n_past += n
            if isinstance(s, SeqCache):
                s.tokens.extend(int(t) for t in self.tokens[r0:r1])
