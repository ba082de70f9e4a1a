"""The Ray-free parts of llamba.cluster and llamba.cluster_router (fast tier): affinity keys, the CLI's checks
before it starts Ray, and the router's choice of replica on stand-in replicas. The cluster itself (a local Ray
cluster with two replicas) is tested in tests/test_cluster.py (slow). Ray is imported inside the tests, never at
collection."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray.serve", reason="llamba[cluster] (ray[serve]) is not installed")
    from llamba import cluster
    return cluster


def test_affinity_keys(cluster):
    """The conversation key: equal for later turns of a chat, different for another conversation."""
    turn1 = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}]}
    turn2 = {"model": "m", "messages": turn1["messages"] + [{"role": "assistant", "content": "a1"},
                                                              {"role": "user", "content": "q2"}]}
    other = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q9"}]}
    k = lambda p, b, h=(): cluster.affinity_key(p, json.dumps(b).encode(), h)  # noqa: E731
    assert k("/v1/chat/completions", turn1) == k("/v1/chat/completions", turn2) is not None
    assert k("/v1/chat/completions", other) != k("/v1/chat/completions", turn1)
    long = "word " * 100
    assert k("/v1/completions", {"prompt": long + "a"}) == k("/v1/completions", {"prompt": long + "b"})
    assert k("/v1/completions", {"prompt": "short a"}) != k("/v1/completions", {"prompt": "short b"})
    assert k("/v1/embeddings", {"input": "x"}) is None
    assert k("/v1/chat/completions", other, [(b"x-session-id", b"abc")]) == \
        k("/v1/completions", {"prompt": "z"}, [(b"x-session-id", b"abc")])
    assert cluster.affinity_key("/v1/completions", b"{not json", ()) is None


def test_cli_cluster_serve_checks_before_starting_ray(tmp_path, capsys, cluster):
    import ray
    from llamba.cli import main
    assert main(["cluster", "serve", "-m", str(tmp_path / "missing.gguf")]) == 1
    assert "no model file" in capsys.readouterr().err
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert main(["cluster", "serve", "-m", str(tmp_path / "m.gguf"), "--min-replicas", "3",
                 "--max-replicas", "2"]) == 1
    assert "--min-replicas" in capsys.readouterr().err
    assert not ray.is_initialized()


def _replica(uid):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=uid))


def _request(rid, affinity=None, avoid=None, ticket=None):
    kw = {k: v for k, v in (("affinity", affinity), ("avoid", avoid), ("ticket", ticket)) if v is not None}
    return SimpleNamespace(kwargs=kw, metadata=SimpleNamespace(internal_request_id=rid))


def test_router_prefers_the_conversation_owner_then_the_least_loaded(cluster):
    """LlambaRouter's bookkeeping on stand-in replicas (no Ray Serve controller): requests in flight counted from
    routing to completion, a known conversation back to its replica while it has a free slot, a replica to avoid
    (a retry) skipped, and a dead replica's state forgotten."""
    from llamba.cluster_router import LlambaRouter
    r = object.__new__(LlambaRouter)  # the router's own state only (RequestRouter.__init__ wants a controller)
    r.initialize_state(imbalance=0, slots=2)
    a, b = _replica("A"), _replica("B")

    def choose(req):
        return [[x.replica_id.unique_id for x in rank] for rank in asyncio.run(r.choose_replicas([a, b], req))]

    # a new conversation: least loaded first (a tie keeps the candidates' order)
    assert choose(_request("1", affinity="conv")) == [["A"], ["B"]]
    r.on_request_routed(_request("1", affinity="conv", ticket="t1"), a.replica_id, None)
    assert r._inflight["A"] == 1 and cluster.routed_to("t1") == "A" and cluster.routed_to("t1") is None
    # without a key: the least loaded replica (B) first
    assert choose(_request("2")) == [["B"], ["A"]]
    # the conversation again: its owner A, though busier, has a free slot
    assert choose(_request("3", affinity="conv")) == [["A"], ["B"]]
    assert r.hits == 1
    r.on_request_routed(_request("3", affinity="conv"), a.replica_id, None)
    # A full (2 slots) and busier than B: the conversation moves on
    assert choose(_request("4", affinity="conv")) == [["B"], ["A"]]
    assert r.misses == 2  # the first, unknown key and this one
    # a retry avoids the replica that failed
    assert choose(_request("5", avoid="B")) == [["A"]]
    r.on_request_completed(a.replica_id, "1")
    r.on_request_completed(a.replica_id, "3")
    assert r._inflight["A"] == 0 and not r._req_replica
    r._forget("A")
    assert "conv" not in r._owner and "A" not in r._inflight
