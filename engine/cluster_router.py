"""The request router of llamba's Ray Serve deployment (see llamba.cluster and docs/cluster.md).

Ray Serve pickles this module by value into the process that routes (the ingress), so it holds the router class
only: no locks or other state at module level.
"""
from __future__ import annotations

import collections

from ray.serve.request_router import RequestRouter


class LlambaRouter(RequestRouter):
    """Prefix affinity, else the fewest requests in flight (counted here, from routing to completion).

    A request whose affinity key was seen goes to the replica that served it while that replica has a free decode
    slot (`slots` = its n_parallel), or is at most `imbalance` requests busier than the least-loaded one; otherwise,
    and for requests without a key, replicas are ranked by requests in flight, fewest first."""

    def initialize_state(self, imbalance: int = 0, slots: int = 4, max_keys: int = 100_000, **kwargs):
        self.imbalance = int(imbalance)
        self.slots = int(slots)
        self.max_keys = int(max_keys)
        self._owner: collections.OrderedDict = collections.OrderedDict()  # affinity key -> replica unique id
        self._inflight: dict[str, int] = collections.defaultdict(int)
        self._req_replica: dict[str, str] = {}  # internal request id -> replica unique id
        self.hits = self.misses = 0

    def _state(self):
        if not hasattr(self, "_owner"):  # initialize_state not called (no kwargs given)
            self.initialize_state()

    async def choose_replicas(self, candidate_replicas: list, pending_request=None) -> list:
        self._state()
        kw = (pending_request.kwargs or {}) if pending_request is not None else {}
        avoid = kw.get("avoid")
        cands = [r for r in candidate_replicas if r.replica_id.unique_id != avoid] or list(candidate_replicas)
        order = sorted(cands, key=lambda r: self._inflight.get(r.replica_id.unique_id, 0))
        key = kw.get("affinity")
        if key is not None and order:
            owner = self._owner.get(key)
            least = self._inflight.get(order[0].replica_id.unique_id, 0)
            for r in order:
                if r.replica_id.unique_id == owner:
                    load = self._inflight.get(owner, 0)
                    # the owner has a free decode slot (joining its batch costs little), or is not busier than
                    # the least-loaded replica by more than `imbalance`
                    if load < self.slots or load - least <= self.imbalance:
                        self._owner.move_to_end(key)
                        self.hits += 1
                        return [[r]] + [[x] for x in order if x is not r]
                    break
            self.misses += 1
        # one replica per rank, fewest in flight first: Ray Serve takes the first whose queue is not full
        return [[r] for r in order]

    def on_request_routed(self, pending_request, replica_id, result):
        self._state()
        rid = replica_id.unique_id
        self._inflight[rid] += 1
        kw = pending_request.kwargs or {}
        self._req_replica[pending_request.metadata.internal_request_id] = rid
        key = kw.get("affinity")
        if key is not None:
            self._owner[key] = rid
            self._owner.move_to_end(key)
            while len(self._owner) > self.max_keys:
                self._owner.popitem(last=False)
        if kw.get("ticket"):
            from llamba import cluster  # the real module of this process (this one is pickled by value)
            cluster._note_routed(kw["ticket"], rid)

    def on_request_completed(self, replica_id, internal_request_id):
        self._state()
        rid = self._req_replica.pop(internal_request_id, None) or replica_id.unique_id
        if self._inflight.get(rid, 0) > 0:
            self._inflight[rid] -= 1

    def _forget(self, rid: str):
        self._inflight.pop(rid, None)
        for k in [k for k, v in self._owner.items() if v == rid]:
            del self._owner[k]

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self._state()
        self._forget(replica_id.unique_id)

    def update_replicas(self, replicas):
        out = super().update_replicas(replicas)
        self._state()
        live = {r.replica_id.unique_id for r in replicas}
        for rid in [r for r in list(self._inflight) if r not in live]:
            self._forget(rid)
        for k in [k for k, v in self._owner.items() if v not in live]:
            del self._owner[k]
        return out
