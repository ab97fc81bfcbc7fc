"""The trained DSA checkpoint shipped in the package: it is trained, the tools work on it, bad files are refused.

Most tests keep only its first 4 layers (``load_checkpoint(num_layers=4)``): a kept layer selects exactly
the keys it selects in the whole model, and compiling 4 layers keeps each test a few seconds on CPU.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from fx_indexcache import indexcache_eager_backend
from fx_indexcache.models.reference import corpus
from fx_indexcache.tools.calibration import ProbeTarget, calibration_windows
from fx_indexcache.tools.overlap import overlap_of_target
from fx_indexcache.tools.pattern_search import PatternScorer, greedy_search
from fx_indexcache.models.reference.checkpoint import (
    default_checkpoint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    tensors_digest,
)
from fx_indexcache.models.reference.evaluation import bits_per_byte, shuffled_indexers
from fx_indexcache.session import clear_reports, reports

LAYERS = 4


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(num_layers=LAYERS)


@pytest.fixture(scope="module")
def held_out():
    return corpus.windows(corpus.as_tokens(corpus.read_files(corpus.HELD_OUT_FILES)), 512)


def mean_adjacent(model, batches) -> float:
    result = overlap_of_target(ProbeTarget("m", model, LAYERS, batches, lambda fn, ids: fn(ids)))
    assert result.layers == list(range(LAYERS)) and result.k == model.config.index_topk
    values = [v for _, _, v in result.adjacent]
    return sum(values) / len(values)


# ----------------------------------------------------------------------------------- the shipped file


def test_shipped_checkpoint_is_a_trained_v32_shaped_model_within_the_size_limit(held_out):
    path = default_checkpoint()
    assert path.stat().st_size <= 8 * 2**20
    whole = load_checkpoint()
    c = whole.config
    assert c.num_layers >= 8 and c.max_seq_len >= 1024 and c.vocab_size == 256
    assert 16 <= c.index_topk <= c.max_seq_len // 8  # top-k well below the context: the selection matters
    # a random byte model scores ~8 bits/byte; the trained one must have learnt Python source
    assert bits_per_byte(whole, held_out[:2, :256], batch_size=2) < 3.0
    meta = read_metadata(path)
    assert int(meta["steps"]) > int(meta["dense_steps"]) > 0  # dense warm-up, then sparse training


def test_adjacent_overlap_is_clearly_above_the_same_model_with_shuffled_indexers(model, held_out):
    batches = [held_out[:1]]  # 512 bytes, top-64: a random selection overlaps little
    trained, shuffled = mean_adjacent(model, batches), mean_adjacent(shuffled_indexers(model), batches)
    assert trained > shuffled + 0.15, (trained, shuffled)  # measured: 0.56 vs 0.29


# ----------------------------------------------------------------------------------- the tools on it


def test_compiled_model_under_a_pattern_equals_the_hand_written_index_cache(model, held_out):
    ids = held_out[:2, :160]
    pattern = "FSFS"
    oracle = copy.deepcopy(model)
    oracle.set_index_cache_pattern(pattern)
    compiled = torch.compile(model, backend=indexcache_eager_backend, options={"index_topk_pattern": pattern})
    clear_reports()
    with torch.no_grad():
        got, got_indices = compiled(ids, None, 0, True)
        want, want_indices = oracle(ids, None, 0, True)
        all_f = model(ids)
    assert reports() and reports()[0].indexers_removed == 2  # the pass rewrote the two S layers
    for layer in range(LAYERS):
        assert torch.equal(got_indices[layer], want_indices[layer])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - all_f).abs().max() > 1e-3  # the pattern changed the output: the comparison is not vacuous


def search_steps(seed: int):
    windows = calibration_windows(128, 2, seed)
    model = load_checkpoint(num_layers=LAYERS)
    scorer = PatternScorer(ProbeTarget("m", model, LAYERS, [windows], lambda fn, ids: fn(ids)), "loss")
    return windows, greedy_search(scorer, LAYERS, scorer.layers, 2, scorer.fixed)


def test_search_is_deterministic_for_a_fixed_seed():
    torch._dynamo.reset()
    windows_a, a = search_steps(seed=5)
    torch._dynamo.reset()
    windows_b, b = search_steps(seed=5)
    windows_c = calibration_windows(128, 2, 6)
    assert torch.equal(windows_a, windows_b) and not torch.equal(windows_a, windows_c)
    assert len(a) == 3 and [(s.pattern, s.score, s.candidates) for s in a] == [
        (s.pattern, s.score, s.candidates) for s in b]
    assert a[-1].pattern.count("F") == 2  # two layers turned S
    # greedy: each step keeps its best candidate (whether S costs loss depends on the windows: on Python 3.12's
    # stdlib, where trace.py differs, the chosen pattern scored below all-F, so no sign is asserted here)
    assert all(step.score == min(step.candidates.values()) for step in a[1:])


# ----------------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def stored():
    path = default_checkpoint()
    return load_file(str(path)), read_metadata(path)


def write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


def test_flipped_byte_in_the_weights_is_refused(tmp_path):
    data = bytearray(default_checkpoint().read_bytes())
    data[-100] ^= 0x40
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*tensors_sha256"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_truncated_or_foreign_file_is_refused(tmp_path):
    data = default_checkpoint().read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "text.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "text.safetensors")
    foreign = write(tmp_path / "foreign.safetensors", {"w": torch.zeros(2)}, {"format": "other"})
    with pytest.raises(ValueError, match=r"'format' is 'other', expected 'fx_indexcache.reference.v1'"):
        load_checkpoint(foreign)


def test_config_that_does_not_match_the_tensors_is_refused(tmp_path, stored):
    tensors, meta = stored
    config = json.loads(meta["config"])
    wider = dict(meta, config=json.dumps(dict(config, hidden_size=config["hidden_size"] * 2)))
    with pytest.raises(ValueError, match=r"tensor 'embed.weight' has shape .*, expected .* from its config"):
        load_checkpoint(write(tmp_path / "wide.safetensors", tensors, wider))
    deeper = dict(meta, config=json.dumps(dict(config, num_layers=config["num_layers"] + 1,
                                               first_k_dense_layers=config["num_layers"] + 1)))
    with pytest.raises(ValueError, match=r"missing \['layers\.16\."):
        load_checkpoint(write(tmp_path / "deep.safetensors", tensors, deeper))
    unknown = dict(meta, config=json.dumps(dict(config, flash=True)))
    with pytest.raises(ValueError, match=r"unknown fields \['flash'\]"):
        load_checkpoint(write(tmp_path / "unknown.safetensors", tensors, unknown))
    invalid = dict(meta, config=json.dumps(dict(config, index_topk=0)))
    with pytest.raises(ValueError, match=r"DSAModelConfig.index_topk=0"):
        load_checkpoint(write(tmp_path / "invalid.safetensors", tensors, invalid))
    with pytest.raises(ValueError, match=r"num_layers=99 is invalid"):
        load_checkpoint(num_layers=99)


def test_save_then_load_round_trips(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"note": "x"})
    back = load_checkpoint(path)
    assert back.config == model.config and back.checkpoint_metadata["note"] == "x"
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name  # the shipped weights are bf16 already: bf16 storage loses nothing
    assert tensors_digest(load_file(str(path))) == read_metadata(path)["tensors_sha256"]


def test_pattern_scorer_loss_is_the_hand_written_index_cache_loss(model, held_out):
    """The quality table's numbers come from the hand-written IndexCache; the search tool must score the same."""
    windows = held_out[:2, :192]
    scorer = PatternScorer(ProbeTarget("m", model, LAYERS, [windows], lambda fn, ids: fn(ids)), "loss")
    for pattern in ("FFFF", "FSFS", "FSSS"):
        want = bits_per_byte(model, windows, pattern) * math.log(2)
        assert scorer(pattern) == pytest.approx(want, rel=1e-5), pattern
    assert scorer("FSSS") > scorer("FFFF")
