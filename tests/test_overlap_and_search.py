"""``overlap`` and ``search``: top-k recorded and switched through the traced graph, overlap, greedy search.

The toy model below gives every layer's indexer the same input (the normed embedding), so a layer
whose indexer weights are copied from the previous layer scores exactly the same and selects the
same keys, while its attention still reads its own hidden state. (In the reference model a copied
indexer is not enough: each layer's indexer reads its own hidden state; the reference test makes the
previous layer inert so both see the same one.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fx_indexcache import IndexCacheConfig
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel
from fx_indexcache.tools import cli
from fx_indexcache.tools.calibration import ProbeTarget, record_batches
from fx_indexcache.tools.overlap import overlap_fraction, overlap_from_records
from fx_indexcache.tools.pattern_search import PatternScorer, greedy_search, resolve_target
from fx_indexcache.tools.probe import IndexProbe, source_layers

HIDDEN, TOPK, SEQ, VOCAB = 16, 4, 16, 32


class ToyIndexer(nn.Module):
    def __init__(self, heads: int = 2, dim: int = 8, select: str = "topk") -> None:
        super().__init__()
        self.heads, self.dim, self.select = heads, dim, select
        self.wq = nn.Linear(HIDDEN, heads * dim, bias=False)
        self.wk = nn.Linear(HIDDEN, dim, bias=False)
        self.weights_proj = nn.Linear(HIDDEN, heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.heads, self.dim)
        logits = torch.einsum("bshd,btd->bsht", q, self.wk(x))
        score = torch.einsum("bsh,bsht->bst", self.weights_proj(x), F.relu(logits))
        future = torch.arange(S)[None, :] > torch.arange(S)[:, None]
        masked = score.masked_fill(future, float("-inf"))
        if self.select == "sort":  # the same keys, picked by a descending sort cut to k
            return masked.sort(-1, descending=True).indices[..., : min(TOPK, S)]
        return masked.topk(min(TOPK, S), dim=-1).indices


class ToyLayer(nn.Module):
    def __init__(self, select: str = "topk") -> None:
        super().__init__()
        self.indexer = ToyIndexer(select=select)
        self.norm = nn.LayerNorm(HIDDEN)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4))

    def forward(self, h: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        indices = self.indexer(x0)  # [B, S, K]
        B, S, K = indices.shape
        x = self.norm(h)
        flat = indices.reshape(B, S * K, 1).expand(B, S * K, HIDDEN)
        keys = torch.gather(self.wk(x), 1, flat).view(B, S, K, HIDDEN)
        values = torch.gather(self.wv(x), 1, flat).view(B, S, K, HIDDEN)
        att = torch.einsum("bsh,bskh->bsk", self.wq(x), keys) * HIDDEN**-0.5
        att = att.masked_fill(indices > torch.arange(S).view(1, S, 1), float("-inf")).softmax(-1)
        return h + self.wo(torch.einsum("bsk,bskh->bsh", att, values))


class ToyDSA(nn.Module):
    """Every indexer reads the normed embedding; ``copies`` layers get the previous layer's indexer weights."""

    def __init__(self, num_layers: int, copies: tuple[int, ...], seed: int = 0, select: str = "topk") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.norm0 = nn.LayerNorm(HIDDEN)
        self.layers = nn.ModuleList(ToyLayer(select) for _ in range(num_layers))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        for layer in copies:
            self.layers[layer].indexer.load_state_dict(self.layers[layer - 1].indexer.state_dict())
        self.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        x0 = self.norm0(h)
        for layer in self.layers:
            h = layer(h, x0)
        return self.lm_head(h)


def toy_target(num_layers: int, copies: tuple[int, ...], batches: int = 2, select: str = "topk") -> ProbeTarget:
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(0, VOCAB, (2, SEQ), generator=generator) for _ in range(batches)]
    model = ToyDSA(num_layers, copies, select=select)
    return ProbeTarget("toy", model, num_layers, data, lambda fn, ids: fn(ids))


# ----------------------------------------------------------------------------------- units


def test_overlap_fraction_counts_common_keys_and_ignores_padding():
    a = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    b = torch.tensor([[3, 2, 9, 8], [7, 6, 5, 4]])
    assert overlap_fraction(a, b) == pytest.approx((2 / 4 + 1) / 2)
    # a query that sees 2 keys: the two padding slots (index 0 chosen at -inf) must not count
    short = torch.tensor([[1, 0, 0, 0]])
    valid = torch.tensor([[True, True, False, False]])
    assert overlap_fraction(short, torch.tensor([[0, 1, 0, 0]]), valid, valid, skip_short=False) == 1.0
    assert overlap_fraction(short, torch.tensor([[1, 0, 0, 0]]), None, None) == 1.0  # padding counted as keys
    # with some full-width query present, the short one is left out
    both = torch.cat([torch.tensor([[0, 1, 2, 3]]), short])
    other = torch.cat([torch.tensor([[0, 1, 8, 9]]), torch.tensor([[0, 1, 0, 0]])])
    full_valid = torch.cat([torch.ones(1, 4, dtype=torch.bool), valid])
    assert overlap_fraction(both, other, full_valid, full_valid) == 0.5


def test_source_layers_follow_the_one_buffer_rule():
    assert source_layers("FSSFS", [0, 1, 2, 3, 4]) == {1: 0, 2: 0, 4: 3}
    assert source_layers(None, [0, 1]) == {}
    assert source_layers("SSF", [0, 1, 2]) == {1: 0}  # layer 0 computes (nothing before it); layer 1 reads it
    # layer 2 is F without an indexer (DeepSeek-V4): the S layer after it reads the nearest indexed layer that computed
    assert source_layers("FSFS", [0, 1, 3]) == {1: 0, 3: 0}


def test_source_layers_agree_with_the_config_the_pass_uses():
    for pattern in ("SSF", "FSSFS", "SFSS", "FFSS", "SSSS"):
        config = IndexCacheConfig(use_index_cache=True, index_topk_pattern=pattern)
        sources = config.buffer_sources(range(len(pattern)))
        expected = {layer: source for layer, source in sources.items() if source != layer}
        assert source_layers(pattern, list(range(len(pattern)))) == expected, pattern
        assert config.executed_pattern(len(pattern)) == "".join("S" if i in expected else "F" for i in range(len(pattern)))


def test_resolve_target():
    assert resolve_target("0.25", 8) == 2
    assert resolve_target("3", 8) == 3
    assert resolve_target(0.1, 4) == 1
    with pytest.raises(ValueError):
        resolve_target("9", 8)


def test_greedy_search_on_a_synthetic_score():
    cost = {1: 5.0, 2: 0.0, 3: 1.0, 4: 0.0}  # turning a layer to S costs this much, additively
    steps = greedy_search(lambda p: sum(cost[i] for i, c in enumerate(p) if c == "S"), 5, [0, 1, 2, 3, 4], 2)
    assert [s.turned for s in steps] == [None, 4, 2, 3]  # ties (2 and 4 at 0) go to the later layer
    assert steps[-1].pattern == "FFSSS" and steps[-1].score == 1.0
    fixed = greedy_search(lambda p: 0.0, 4, [0, 1, 2, 3], 1, fixed={3: "values used"})
    assert fixed[-1].pattern == "FSSF"


# ----------------------------------------------------------------------------------- toy model


@pytest.mark.parametrize("select", ["topk", "sort"])
def test_overlap_is_one_exactly_between_layers_with_the_same_indexer(select):
    target = toy_target(5, copies=(2, 4), select=select)
    probe = IndexProbe(switchable=False)
    compiled = torch.compile(target.model, backend=probe, dynamic=False)
    batches = record_batches(target, probe, compiled)
    assert probe.layers == [0, 1, 2, 3, 4]
    for records, ids in zip(batches, target.batches):  # what the graph recorded is what the eager model selects
        with torch.no_grad():
            x0 = target.model.norm0(target.model.embed(ids))
            for layer in range(5):
                assert torch.equal(records[layer].indices, target.model.layers[layer].indexer(x0))
    result = overlap_from_records(batches)
    adjacent = {(a, b): value for a, b, value in result.adjacent}
    assert adjacent[(1, 2)] == 1.0 and adjacent[(3, 4)] == 1.0
    assert adjacent[(0, 1)] < 0.9 and adjacent[(2, 3)] < 0.9
    assert result.matrix[1, 3] < 0.9 and result.matrix[0, 4] < 0.9
    assert torch.equal(result.matrix, result.matrix.T) and torch.all(result.matrix.diagonal() == 1)


@pytest.mark.parametrize("select", ["topk", "sort"])
def test_search_keeps_exactly_the_layers_whose_indexer_differs(select, tmp_path, capsys, monkeypatch):
    import fx_indexcache.tools.pattern_search as search

    target = toy_target(6, copies=(2, 4, 5), select=select)
    scorers = []

    class Keep(PatternScorer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scorers.append(self)

    monkeypatch.setattr(search, "build_target", lambda args: target)
    monkeypatch.setattr(search, "PatternScorer", Keep)
    plot = tmp_path / "search.png"
    assert cli.main(["search", "--target", "0.5", "--out", str(plot)]) == 0
    text = capsys.readouterr().out
    # F at 0, 1, 3: the layers whose indexer differs from the one before
    assert "best pattern (3 F of 6 DSA layers): FFSFSS" in text
    assert """--hf-overrides '{"use_index_cache": true, "index_topk_pattern": "FFSFSS"}'""" in text
    assert plot.stat().st_size > 1000
    (scorer,) = scorers
    steps = greedy_search(scorer, 6, scorer.layers, target_f=3, fixed=scorer.fixed)
    assert steps[-1].pattern == "FFSFSS"
    assert [s.score for s in steps] == [0.0, 0.0, 0.0, 0.0]  # sharing identical selections changes nothing
    # making a layer with its own indexer S does change the output
    assert all(steps[1].candidates[layer] > 1e-6 for layer in (1, 3))
    # one more step has to pay
    more = greedy_search(scorer, 6, scorer.layers, target_f=2, fixed=scorer.fixed)
    assert more[-1].score > 1e-6 and more[-1].pattern.count("F") == 2
    assert len(scorer.probe.graphs) == 1  # every candidate ran on the one traced graph


# ----------------------------------------------------------------------------------- reference model


def test_switched_graph_equals_the_hand_written_index_cache():
    config = DSAModelConfig.tiny(num_layers=3, first_k_dense_layers=3)
    model, oracle = ReferenceDSAModel(config, seed=1), ReferenceDSAModel(config, seed=1)
    ids = torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    target = ProbeTarget("reference", model, 3, [ids], lambda fn, x: fn(x))
    scorer = PatternScorer(target, "kl")
    assert scorer.layers == [0, 1, 2] and not scorer.fixed
    for pattern in ("FFF", "FSF", "FSS", "FFS"):
        with torch.no_grad(), scorer.probe.use(pattern):
            got = scorer.compiled(ids)
            oracle.set_index_cache_pattern(pattern)
            want, want_indices = oracle(ids, return_indices=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for layer in range(3):  # every layer's own top-k is recorded, F layers' equal the oracle's
            if pattern[layer] == "F":
                assert torch.equal(scorer.probe.records[layer].indices, want_indices[layer])
    assert scorer("FFF") == 0.0 and scorer("FSS") > 1e-6 and scorer("FFS") > 1e-6
    assert len(scorer.probe.graphs) == 1


def test_overlap_cli_on_reference_with_an_inert_layer_and_a_copied_indexer(tmp_path, capsys, monkeypatch):
    """Layer 1 adds nothing to the residual and layer 2 copies its attention input weights: same keys."""
    import fx_indexcache.tools.overlap as overlap

    original = overlap.build_target

    def patched(args):
        target = original(args)
        layers = target.model.layers
        with torch.no_grad():
            layers[1].attn.wo.weight.zero_()
            layers[1].mlp.w2.weight.zero_()
            for name in ("attn_norm", "attn.wq_a", "attn.q_norm", "attn.indexer"):
                layers[2].get_submodule(name).load_state_dict(layers[1].get_submodule(name).state_dict())
        return target

    monkeypatch.setattr(overlap, "build_target", patched)
    out = tmp_path / "heat.png"
    argv = ["overlap", "--random-weights", "--layers", "3", "--seq-len", "24", "--batches", "1", "--out", str(out)]
    code = cli.main(argv)
    text = capsys.readouterr().out
    assert code == 0 and out.stat().st_size > 1000
    assert "layer  1 ->  2:  1.000" in text
    value01 = float(text.split("layer  0 ->  1:")[1].split()[0])
    assert value01 < 0.95


def test_hf_model_switched_graph_equals_the_indexer_patching_oracle():
    H = pytest.importorskip("hf_oracle")
    tiny = H.build(H.SPECS["deepseek_v32"], num_layers=2)
    inputs = tiny.make_inputs(12)
    target = ProbeTarget("v32", tiny.model, 2, [inputs], lambda fn, batch: fn(**batch, use_cache=False).logits)
    scorer = PatternScorer(target, "kl")
    assert scorer.layers == [0, 1] and not scorer.fixed
    with torch.no_grad():
        with tiny.oracle("FS"):
            want = tiny.model(**inputs, use_cache=False).logits
        with scorer.probe.use("FS"):
            got = scorer.compiled(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, scorer.reference[0])  # sharing changed the output: the switch acted
    assert scorer("FS") > 0 and len(scorer.probe.graphs) == 1


def test_hf_model_without_transformers_names_the_flag_and_the_extra(monkeypatch, capsys):
    """A package installed without its ``hf`` extra: ``--hf-model`` says what is missing, not a traceback from
    inside the builder (which imports transformers only when it runs)."""
    import importlib.util

    from fx_indexcache.tools import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(SystemExit) as raised:
        cli.main(["overlap", "--hf-model", "deepseek_v32", "--random-weights", "--batches", "1"])
    message = str(raised.value)
    assert "--hf-model 'deepseek_v32'" in message and "fx-indexcache[hf]" in message, message


@pytest.mark.parametrize("argv, option, value", [
    (["demo", "--layers", "0"], "--layers", "0"),
    (["demo", "--prompt", "-4"], "--prompt", "-4"),
    (["search", "--batches", "two"], "--batches", "'two'"),
    (["overlap", "--seq-len", "0"], "--seq-len", "0"),
    (["demo", "--decode-steps", "-1"], "--decode-steps", "-1"),  # 0 steps is allowed: the prefill alone
])
def test_a_count_option_below_one_is_refused_by_name(argv, option, value, capsys):
    """Counts (layers, batches, tokens) must be >= 1; 0 used to fall back to the default silently (``--layers 0``
    ran the demo's default depth)."""
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2
    assert f"argument {option}: {value} is not allowed; it must be an int >= " in capsys.readouterr().err
