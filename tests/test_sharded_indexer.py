"""The sharded F-layer indexer (issue 30, item 2): each rank scores its share of the query rows, the top-k is
all-gathered, and every rank ends with exactly the replicated indexer's indices.

The 2-process gloo job covers what breaks a row split: a row count the world size does not divide, a causal
mask from a materialised triangle and from positions (a row must keep its global position after the slice), a
batch of requests of different lengths, and several requests' tokens in one flattened row axis (the engines'
layout, where their split went wrong at concurrency > 1); IndexCache's S layers on top of split F layers; one
Inductor compile (the collective lowered into generated code). Refused and still exact: a score whose rows
depend on each other (a cumulative sum over rows). The single-process tests check the option's validation, the
report without a process group, the uuid per rank, where the graph cuts (read from the graph rank 1 would run)
and the refusal of dynamic shapes.
"""

from __future__ import annotations

import pytest
import torch

import fx_indexcache as fic
from fx_indexcache.rewrite import shard_rows
from conftest import KEYED
from fx_indexcache.rewrite.shard_rows import ShardGroup
from gloo_job import parallel_results, skip_without_gloo
from parallel_programs import MaskedDSA, masked_inputs

#: name -> (mask style, query rows, layers, pattern, backend)
CASES = {
    "causal triangle, 5 rows, FSFS": ("tril", 5, 4, "FSFS", "eager"),
    "batch of 3 requests, lengths 7, 5, 3, causal from positions": ("lengths", 7, 2, "FF", "eager"),
    "batch of 3 requests projected as one [B*T, D] matrix": ("flat batch", 7, 2, "FF", "eager"),
    "3 requests in 7 flattened tokens": ("varlen", 7, 2, "FF", "eager"),
    "rows depend on each other (cumsum)": ("cumsum", 5, 2, "FF", "eager"),
    "Inductor, batch of 3 requests": ("lengths", 7, 1, "F", "inductor"),
}
REFUSED = {"rows depend on each other (cumsum)": "not computed row by row back to the q·k product"}


def _record(record) -> tuple:
    return record.layer, record.sharded, record.start, record.stop, record.rows, record.products, record.reason


def sharded_job() -> dict:
    results = {}
    for name, (style, rows, layers, pattern, kind) in CASES.items():
        torch._dynamo.reset()
        backend_type = fic.IndexCacheBackend if kind == "inductor" else fic.IndexCacheEagerBackend
        inductor = {"compile_threads": 1} if kind == "inductor" else {}  # no worker pool to start for one graph
        backend = backend_type(index_topk_pattern=pattern, shard_indexer_rows=True, **inductor)
        x, meta = masked_inputs(style, rows)
        with torch.no_grad():
            out, found = torch.compile(MaskedDSA(layers, style), backend=backend, dynamic=False)(x, meta)
        (report,) = backend.reports
        results[name] = (out, found, [_record(r) for r in report.row_shards], report.format())
    return results


@pytest.fixture(scope="module")
def ranks():
    return parallel_results("sharded indexer")


def _replicated(name: str):
    style, rows, layers, pattern, _ = CASES[name]
    config = fic.IndexCacheConfig(index_topk_pattern=pattern)
    uses = [config.buffer_sources(range(layers))[i] for i in range(layers)]
    x, meta = masked_inputs(style, rows)
    with torch.no_grad():
        return MaskedDSA(layers, style)(x, meta, uses)


@skip_without_gloo()
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_rank_holds_the_replicated_indices(ranks, name):
    want_out, want = _replicated(name)
    for rank, results in enumerate(ranks):
        out, found, _, _ = results[name]
        assert len(found) == len(want)
        for layer, (got, expected) in enumerate(zip(found, want)):
            assert torch.equal(got, expected), f"rank {rank}, layer {layer}"
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(ranks[0][name][0], ranks[1][name][0])


@skip_without_gloo()
@pytest.mark.parametrize("name", sorted(set(CASES) - set(REFUSED)))
def test_the_computing_layers_split_their_rows(ranks, name):
    _, rows, layers, pattern, _ = CASES[name]
    computing = [i for i, mark in enumerate(pattern) if mark == "F"]
    per = -(-rows // 2)
    for rank, results in enumerate(ranks):
        records = results[name][2]
        assert [r[0] for r in records] == computing  # one record per computing layer; shared layers have none
        for layer, sharded, start, stop, total, products, reason in records:
            assert sharded and reason is None, reason
            assert (start, stop, total) == (rank * per, min((rank + 1) * per, rows), rows)
            assert products >= 3  # the q and weight projections and q·k run on this rank's rows only


@skip_without_gloo()
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_layer_that_cannot_split_says_why_and_runs_whole(ranks, name):
    for results in ranks:
        records, text = results[name][2], results[name][3]
        assert records and all(not r[1] and REFUSED[name] in r[6] for r in records)
        assert "it runs whole on every rank" in text


# ---------------------------------------------------------------------------------------------- one process


def test_a_bad_value_names_the_key_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"shard_indexer_rows='yes' is not allowed; it must be True or False"):
        fic.IndexCacheEagerBackend(shard_indexer_rows="yes")
    with pytest.raises(ValueError, match=r"IndexCachePass: shard_indexer_rows=1 is not allowed"):
        fic.IndexCachePass(shard_indexer_rows=1)
    with pytest.raises(ValueError, match=r"did you mean 'shard_indexer_rows'"):
        fic.IndexCacheEagerBackend(shard_indexer_row=True)


def test_without_a_process_group_the_indexer_runs_whole():
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="FF", shard_indexer_rows=True)
    x, meta = masked_inputs("tril", 5)
    model = MaskedDSA(2, "tril")
    with torch.no_grad():
        _, found = torch.compile(model, backend=backend, dynamic=False)(x, meta)
        _, want = model(x, meta)
    (report,) = backend.reports
    assert [r.layer for r in report.row_shards] == [0, 1]
    assert all("no process group is initialised" in (r.reason or "") for r in report.row_shards)
    assert all(torch.equal(a, b) for a, b in zip(found, want))


def test_each_rank_compiles_its_own_graph(monkeypatch):
    """The rows a rank scores are baked into its graph: the FX graph cache key (uuid) must differ per rank."""
    uuids = set()
    for rank in (0, 1):
        monkeypatch.setattr(ShardGroup, "current", classmethod(lambda cls, rank=rank: cls(rank, 2, "0")))
        uuids.add(fic.IndexCachePass(index_topk_freq=4, shard_indexer_rows=True, context=KEYED).uuid())
    uuids.add(fic.IndexCachePass(index_topk_freq=4, context=KEYED).uuid())
    assert len(uuids) == 3


def _rewrite_as_rank_one(style: str, rows: int):
    """The graph rank 1 of 2 would run, and its records (compiled without a group: the graph is what matters)."""
    from fx_indexcache.detection.registry import detect
    from fx_indexcache.integrations.backend import aten_graph_backend

    graphs, records = [], []

    def rewrite(module):
        records.extend(shard_rows.shard_indexer_rows(module.graph, detect(module.graph).sites, ShardGroup(1, 2, "0")))
        graphs.append(module.graph)
        module.recompile()
        return module.forward

    x, meta = masked_inputs(style, rows)
    with torch.no_grad(), pytest.raises(RuntimeError, match="process group"):  # the all-gather has no group here
        torch.compile(MaskedDSA(1, style), backend=aten_graph_backend(rewrite), dynamic=False)(x, meta)
    (graph,) = graphs
    (record,) = records
    return graph, record


def _calls(graph, op):
    return [node for node in graph.nodes if node.op == "call_function" and node.target == op]


def test_positions_are_sliced_after_they_are_computed_whole():
    """The projections and q·k run on a slice of the hidden states; the causal triangle is built whole and then
    sliced (a triangle built on the slice would mask local positions); one all-gather."""
    graph, record = _rewrite_as_rank_one("tril", 5)
    assert (record.start, record.stop, record.rows) == (3, 5, 5)
    (tril,) = _calls(graph, torch.ops.aten.tril.default)
    assert [(user.target, user.args[1:]) for user in tril.users] == [(torch.ops.aten.slice.Tensor, (0, 3, 5))]
    (bmm,) = _calls(graph, torch.ops.aten.bmm.default)
    assert bmm.meta["val"].shape[1] == 2 * 2  # 2 rows of this rank x 2 heads
    assert len(_calls(graph, torch.ops._c10d_functional.all_gather_into_tensor.default)) == 1
    (topk,) = _calls(graph, torch.ops.aten.topk.default)
    assert topk.args[0].meta["val"].shape == (2, 5)


@pytest.mark.parametrize("style", ["lengths", "flat batch"])
def test_a_batch_merged_before_its_rows_still_projects_only_this_ranks_rows(style):
    """``[B, T, D]`` re-viewed as ``[B*T, D]`` for the projections (once per projection, or once for all three:
    then the merged view is cut, every request's rows 4..6 gathered): 3 requests x 3 rows, nothing else."""
    graph, record = _rewrite_as_rank_one(style, 7)
    assert record.products == 3
    shapes = sorted(tuple(node.meta["val"].shape) for node in _calls(graph, torch.ops.aten.mm.default))
    assert (3 * 3, 8) in shapes and (3 * 3, 2) in shapes  # q and weight projections on 3 requests x 3 rows


def test_dynamic_shapes_are_refused_with_the_reason(monkeypatch):
    x, meta = masked_inputs("tril", 6)
    backend = fic.IndexCacheEagerBackend(index_topk_pattern="F", shard_indexer_rows=True)
    monkeypatch.setattr(ShardGroup, "current", classmethod(lambda cls: cls(1, 2, "0")))
    with torch.no_grad():
        torch.compile(MaskedDSA(1, "tril"), backend=backend, dynamic=True)(x, meta)  # refused: nothing to gather
    (report,) = backend.reports
    (shard,) = report.row_shards
    assert not shard.sharded and "symbolic (dynamic shapes)" in shard.reason
    assert "it runs whole on every rank" in report.format()
