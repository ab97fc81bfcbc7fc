"""IndexCacheBackend: torch.compile modes with Inductor's meaning, a backend object that copies and pickles, and a
user's post-grad pass list chained after ours."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from torch._inductor import list_mode_options
from torch._inductor.custom_graph_pass import CustomGraphPass

import fx_indexcache
from conftest import KEYED, model_pair
from fx_indexcache import IndexCacheBackend, IndexCacheEagerBackend, reports
from fx_indexcache.integrations.backend import _Chain
from fx_indexcache.models.reference import DSAModelConfig

TINY = DSAModelConfig.tiny(num_layers=4, first_k_dense_layers=2)
#: The Inductor options each mode sets, as the pass sees them while it runs.
WATCHED = ("triton.cudagraphs", "max_autotune", "coordinate_descent_tuning")


class RecordingPass(CustomGraphPass):
    """A user's post-grad pass: records the Inductor config in force and how many reports ours had published."""

    def __init__(self, name: str, log: list, published=lambda: len(reports())) -> None:
        self.name, self.log, self.published = name, log, published

    def __call__(self, graph) -> None:
        config = torch._inductor.config
        self.log.append((self.name, self.published(), {key: config.get_config_copy()[key] for key in WATCHED}))

    def uuid(self) -> str:
        return f"recording-{self.name}"


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_each_mode_applies_inductors_own_options_under_ours(mode):
    log: list = []
    owner: dict = {}  # the backend object owns the reports its passes publish
    user_passes = [RecordingPass(name, log, lambda: len(owner["backend"].reports)) for name in ("first", "second")]
    backend = owner["backend"] = IndexCacheBackend(post_grad_custom_post_pass=user_passes)  # a list, as Inductor takes
    compiled = torch.compile(lambda x: torch.sin(x) + 1, backend=backend, mode=mode)
    torch.testing.assert_close(compiled(torch.ones(8)), torch.sin(torch.ones(8)) + 1)
    expected = {key: list_mode_options(mode).get(key, False) for key in WATCHED}
    assert [name for name, _, _ in log] == ["first", "second"]
    assert all(seen_reports == 1 for _, seen_reports, _ in log)  # ours ran (and reported) before the user's passes
    assert all(config == expected for _, _, config in log), (mode, log)
    assert len(backend.reports) == 1


def test_bad_modes_name_the_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"mode='fastest' is not allowed.*'reduce-overhead'"):
        IndexCacheBackend(mode="fastest")
    if "lite" in list_mode_options():  # torch 2.13: it switches the post-grad passes off, ours with them
        with pytest.raises(ValueError, match="post-grad passes"):
            IndexCacheBackend(mode="lite")
    backend = IndexCacheEagerBackend(mode="max-autotune", index_topk_freq=2)
    with pytest.raises(ValueError, match="mode='reduce-overhead'.*mode='max-autotune'"):
        backend.resolve_mode("reduce-overhead")
    with pytest.raises(ValueError, match="index_topk_freq=0"):
        IndexCacheBackend(index_topk_freq=0)


def test_function_backends_take_a_mode_too():
    model, oracle = model_pair(TINY)
    oracle.set_index_cache_pattern("FFSS")  # the functions' default: freq 4, offset 2
    tokens = torch.randint(0, TINY.vocab_size, (1, 24))
    with torch.no_grad():
        got = torch.compile(model, backend=fx_indexcache.indexcache_eager_backend, mode="reduce-overhead")(tokens)
        torch.testing.assert_close(got, oracle(tokens))
    assert reports()[-1].indexers_removed == 2
    with pytest.raises(Exception, match="mode='fastest' is not allowed"):
        torch.compile(model, backend=fx_indexcache.indexcache_backend, mode="fastest")(tokens)


def test_backend_object_copies_as_itself_pickles_and_reads_well():
    from transformers import CompileConfig

    backend = IndexCacheEagerBackend(index_topk_freq=4, mode="reduce-overhead")
    assert repr(backend) == "IndexCacheEagerBackend(index_topk_freq=4, mode='reduce-overhead')"
    assert copy.deepcopy(backend) is backend and copy.copy(backend) is backend
    config = CompileConfig(backend=backend)
    assert config.to_dict()["backend"] is backend  # transformers deep-copies; reports stay on this object
    backend.reports.append("a report")
    restored = pickle.loads(pickle.dumps(backend))
    assert restored == backend and hash(restored) == hash(backend) and restored is not backend
    assert restored.reports == [] and restored.mode == "reduce-overhead"
    assert backend != IndexCacheEagerBackend(index_topk_freq=2, mode="reduce-overhead")
    assert backend != IndexCacheBackend(index_topk_freq=4, mode="reduce-overhead")


def test_a_pass_holding_weak_references_pickles_without_them():
    """Inductor may pickle its config, the pass among it: the model, the frame's modules and the cache owner are
    weak references of this process, left out of the copy."""
    import weakref

    model = torch.nn.Linear(2, 2)
    context = dataclasses.replace(KEYED, model=weakref.ref(model), cache_owner=weakref.ref(model),
                                  frame_modules=(("L.self", weakref.ref(model)),))
    restored = pickle.loads(pickle.dumps(fx_indexcache.IndexCachePass(index_topk_freq=2, context=context)))
    assert restored.context.model is None and restored.context.cache_owner is None
    assert restored.context.frame_modules == () and restored.config.index_topk_freq == 2


def test_chain_uuid_joins_every_pass_and_is_none_when_one_has_none():
    log: list = []
    ours = fx_indexcache.IndexCachePass(index_topk_freq=2, context=KEYED)
    chain = _Chain(ours, [RecordingPass("a", log), (RecordingPass("b", log),)])
    assert len(chain.passes) == 3 and chain.uuid() == repr([ours.uuid(), "recording-a", "recording-b"])
    assert _Chain(ours, [lambda graph: None]).uuid() is None  # Inductor then bypasses its FX graph cache
