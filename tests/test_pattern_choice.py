"""From a checkpoint directory and calibration data to a saved pattern, and from the pattern file to a compiled model.

The directories are built here (tiny transformers DeepSeek-V3.2 and GLM-MoE-DSA models with random weights, and the
shipped reference checkpoint's first layers) and saved the way users get them: ``config.json`` + safetensors. The
CLI searches on them; the saved pattern compiles (eager backend) and the compiled model equals the hand-written
IndexCache oracle at that pattern.
"""

from __future__ import annotations

import json
import sys

import numpy
import pytest
import torch

import fx_indexcache
from fx_indexcache import IndexCacheBackend, IndexCacheConfig, IndexCacheEagerBackend, PatternChoice
from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel
from fx_indexcache.models.reference.checkpoint import load_checkpoint
from fx_indexcache.models.reference.hf_directory import save_directory
from fx_indexcache.tools import cli
from fx_indexcache.tools.calibration import calibration_windows
from fx_indexcache.tools.model_source import calibration_batches, load_model_directory, read_token_file
from fx_indexcache.tools.pattern_choice import config_digest

SEQ = 16  # tiny transformers models: top-k 4, so 16 tokens leave every layer a real choice


class PickledObject:
    """Not a tensor: a file holding one can only be read by unpickling, which the tools never do."""


def _search_cli(capsys, *argv: str) -> str:
    code = cli.main(["search", *argv])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


# ----------------------------------------------------------------------------------- the record


@pytest.fixture(scope="module")
def reference_search():
    config = DSAModelConfig.tiny(num_layers=3, first_k_dense_layers=3)
    model = ReferenceDSAModel(config, seed=1)
    batches = [torch.randint(0, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))]
    return model, batches, fx_indexcache.search_pattern(model, batches, keep=2)


def test_search_pattern_record_round_trips_and_refuses_other_models(tmp_path, reference_search):
    model, batches, choice = reference_search
    assert {"measure_overlap", "search_pattern", "PatternChoice"} <= set(fx_indexcache.__all__)
    assert choice.pattern.count("F") == 2 and choice.pattern[0] == "F" and len(choice.pattern) == 3
    assert choice.model_class == "ReferenceDSAModel" and choice.num_layers == 3
    assert choice.uniform_pattern == "FSF" and choice.uniform_score is not None
    assert choice.score <= choice.uniform_score  # greedy tried the uniform pattern's S layer at step 1 too
    assert [s.pattern.count("S") for s in choice.steps] == [0, 1]
    assert choice.hf_overrides() == {"use_index_cache": True, "index_topk_pattern": choice.pattern}
    assert json.loads(choice.sglang_argument().split(" ", 1)[1].strip("'")) == choice.hf_overrides()
    path = choice.save(tmp_path / "p.json")
    assert PatternChoice.load(path) == choice
    choice.check(model)
    with pytest.raises(ValueError, match=r"for model class 'ReferenceDSAModel' \(3 layers\), not 'Linear'"):
        choice.check(torch.nn.Linear(2, 2))
    deeper = ReferenceDSAModel(DSAModelConfig.tiny(num_layers=4, first_k_dense_layers=4))
    with pytest.raises(ValueError, match="for 3 decoder layers of ReferenceDSAModel; this model has 4"):
        choice.check(deeper)
    # the same data gives the same digest; other data another one
    again = fx_indexcache.search_pattern(model, [b.clone() for b in batches], keep=2)
    assert again.calibration_digest == choice.calibration_digest and again.config_digest == choice.config_digest
    other = fx_indexcache.search_pattern(model, [batches[0].flip(-1)], keep=2)
    assert other.calibration_digest != choice.calibration_digest


def test_pattern_file_errors_name_the_file_and_the_field(tmp_path, reference_search):
    _, _, choice = reference_search
    good = choice.to_dict()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps(good)[:50])
    with pytest.raises(ValueError, match=f"pattern file {truncated}: not JSON"):
        PatternChoice.load(truncated)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**good, "pattern": "FSX"}))
    with pytest.raises(ValueError, match=f"pattern file {wrong}: field 'pattern' is 'FSX'"):
        PatternChoice.load(wrong)
    with pytest.raises(ValueError, match="field 'format'"):
        PatternChoice.from_dict({**good, "format": "other"})
    with pytest.raises(ValueError, match="objective"):
        fx_indexcache.search_pattern(torch.nn.Linear(2, 2), [torch.zeros(1, 2, dtype=torch.long)], objective="mse")
    with pytest.raises(ValueError, match=r"batches\[0\]: token ids must be an integer tensor"):
        fx_indexcache.search_pattern(torch.nn.Linear(2, 2), [torch.zeros(1, 2)])


def test_backend_pattern_file_and_from_config(tmp_path, reference_search):
    _, _, choice = reference_search
    path = choice.save(tmp_path / "p.json")
    backend = IndexCacheBackend(pattern_file=str(path))
    config, rest = IndexCacheConfig.from_options(backend.options)
    assert (config.index_topk_pattern, config.num_layers, rest) == (choice.pattern, 3, {})
    assert IndexCacheEagerBackend(pattern_file=path) == IndexCacheEagerBackend(**choice.index_cache_options())
    with pytest.raises(ValueError, match="pattern file .* is for 3 decoder layers of ReferenceDSAModel; num_layers=5"):
        IndexCacheBackend(pattern_file=path, num_layers=5)
    with pytest.raises(ValueError, match=r"sets the pattern; \['index_topk_freq'\] given beside it"):
        IndexCacheBackend(pattern_file=path, index_topk_freq=2)

    # a GLM-5.2-style config: the engines' keys and its layer count, as vLLM and SGLang read them
    glm = {"model_type": "glm_moe_dsa", "num_hidden_layers": 8, "index_topk_freq": 4, "index_skip_topk_offset": 3}
    config, _ = IndexCacheConfig.from_options(IndexCacheBackend.from_config(glm).options)
    assert config.num_layers == 8 and config.pattern_for(8) == "FFFSSSFS"
    # no IndexCache keys: the backend's default (freq 4), for the layers the model has
    config, _ = IndexCacheConfig.from_options(IndexCacheBackend.from_config({"num_hidden_layers": 6}).options)
    assert config.num_layers == 6 and config.pattern_for(6) == "FFSSSF"
    # the reference model's own config (num_layers) and the pattern file made for it
    reference = DSAModelConfig.tiny(num_layers=3, first_k_dense_layers=3)
    config, _ = IndexCacheConfig.from_options(IndexCacheBackend.from_config(reference, pattern_file=path).options)
    assert (config.index_topk_pattern, config.num_layers) == (choice.pattern, 3)
    with pytest.raises(ValueError, match="pattern file is for 3 decoder layers of ReferenceDSAModel; the config has "
                                         "num_hidden_layers=8"):
        IndexCacheBackend.from_config({"num_hidden_layers": 8}, pattern_file=path)
    with pytest.raises(ValueError, match="index_topk_freq"):
        IndexCacheBackend.from_config({"num_hidden_layers": 8, "index_topk_freq": 0})


# ----------------------------------------------------------------------------------- input files


def test_calibration_files_are_read_without_code_and_bad_ones_are_named(tmp_path):
    ids = torch.arange(2, 42).view(2, 20)
    numpy.save(tmp_path / "ids.npy", ids.numpy())
    torch.save({"input_ids": ids}, tmp_path / "ids.pt")
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps(row) for row in ids.tolist()) + "\n")
    for name in ("ids.npy", "ids.pt", "ids.jsonl"):
        assert torch.equal(torch.stack(read_token_file(tmp_path / name)), ids), name
    batches = calibration_batches(tmp_path / "ids.npy", None, seq_len=8, batch_size=1, batches=5)
    assert [b.tolist() for b in batches] == [[ids[0, :8].tolist()], [ids[1, :8].tolist()]]
    text = tmp_path / "text.txt"
    text.write_bytes(b"abcdefgh" * 3)
    assert calibration_batches(text, None, seq_len=8, batch_size=2, batches=1)[0].tolist() == [list(b"abcdefgh")] * 2

    (tmp_path / "bad.jsonl").write_text("[1, 2, 3]\n[4, 5\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not JSON"):
        read_token_file(tmp_path / "bad.jsonl")
    numpy.save(tmp_path / "objects.npy", numpy.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="objects.npy: not a readable .npy"):
        read_token_file(tmp_path / "objects.npy")
    torch.save({"input_ids": ids, "payload": PickledObject()}, tmp_path / "pickled.pt")  # only unpickling reads it
    with pytest.raises(ValueError, match="pickled.pt: not a readable tensor file"):
        read_token_file(tmp_path / "pickled.pt")
    raw = (tmp_path / "ids.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.pt: not a readable tensor file"):
        read_token_file(tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="no sequence holds --seq-len 64 tokens"):
        calibration_batches(tmp_path / "ids.npy", None, seq_len=64, batch_size=1, batches=1)


def test_directories_that_are_not_dsa_models_or_are_truncated_are_named(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"not a DeepSeek-Sparse-Attention model: .*'llama'.*index_topk"):
        load_model_directory(plain)
    with pytest.raises(ValueError, match="no config.json"):
        load_model_directory(tmp_path)
    model = ReferenceDSAModel(DSAModelConfig.tiny(num_layers=2))
    directory = save_directory(model, tmp_path / "ref")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors: .*truncated"):
        load_model_directory(directory)
    with pytest.raises(SystemExit, match="give --calibration FILE"):
        cli.main(["search", "--model", str(directory)])


def test_a_directory_whose_graph_holds_no_indexer_is_refused_naming_what_was_looked_for(tmp_path):
    """Config keys can claim an indexer the model does not have: the traced graph decides."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    raw = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**raw, "index_topk": 4}))
    numpy.save(tmp_path / "ids.npy", numpy.arange(2, 34).reshape(2, 16))
    argv = ["--model", str(tmp_path / "llama"), "--calibration", str(tmp_path / "ids.npy"), "--seq-len", "16",
            "--out", str(tmp_path / "x.png")]
    for command in ("search", "overlap"):
        with pytest.raises(SystemExit, match=r"LlamaForCausalLM: no DSA lightning-indexer top-k found .*looked for"):
            cli.main([command, *argv])


# ----------------------------------------------------------------------------------- real directories


def test_cli_on_the_reference_directory_finds_the_built_in_pattern(tmp_path, capsys, monkeypatch):
    """The shipped checkpoint's first 4 layers saved as config.json + model.safetensors, searched on the built-in
    path's own calibration windows: the same pattern, the same scores."""
    directory = save_directory(load_checkpoint(num_layers=4), tmp_path / "ref4", dtype=torch.bfloat16)
    assert json.loads((directory / "config.json").read_text())["architectures"] == ["ReferenceDSAModel"]
    windows = calibration_windows(256, 4, seed=0)  # what `search --layers 4` calibrates on by default
    numpy.save(tmp_path / "windows.npy", windows.numpy())
    built_in = _search_cli(capsys, "--layers", "4", "--keep", "2", "--save", str(tmp_path / "a.json"),
                           "--out", str(tmp_path / "a.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # plots are optional: the search runs without matplotlib
    from_dir = _search_cli(capsys, "--model", str(directory), "--calibration", str(tmp_path / "windows.npy"),
                           "--keep", "2", "--save", str(tmp_path / "b.json"))
    assert cli.main(["search", "--model", str(directory), "--plot", str(tmp_path / "b.png")]) == 2  # asked: says so
    assert "fx-indexcache[plots]" in capsys.readouterr().err
    a, b = PatternChoice.load(tmp_path / "a.json"), PatternChoice.load(tmp_path / "b.json")
    assert a.pattern == b.pattern and "S" in a.pattern
    assert [s.score for s in a.steps] == [s.score for s in b.steps]
    assert (a.calibration_digest, a.config_digest, a.model_class) == (b.calibration_digest, b.config_digest,
                                                                      b.model_class)
    assert f"best pattern (2 F of 4 DSA layers): {a.pattern}" in built_in and a.pattern in from_dir
    assert (tmp_path / "a.png").is_file() and not (tmp_path / "b.png").exists()


def _save_character_tokenizer(directory) -> None:
    """A one-character-a-token tokenizer (ids 3..33, inside the tiny models' vocabulary of 96), saved beside the
    model as tokenizer.json + tokenizer_config.json, as a checkpoint ships its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .,\n")}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


@pytest.mark.parametrize("name", ["deepseek_v32", "glm_moe_dsa"])
def test_saved_transformers_directory_searched_compiled_equals_oracle(name, tmp_path, capsys):
    H = pytest.importorskip("hf_oracle")
    tiny = H.build(H.SPECS[name], seed=3)
    directory = tmp_path / name
    tiny.model.save_pretrained(directory)
    if name == "deepseek_v32":  # the directory has a tokenizer: calibrate on text
        _save_character_tokenizer(directory)
        calibration = tmp_path / "text.txt"
        calibration.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    else:  # token ids, one sequence a line
        calibration = tmp_path / "ids.jsonl"
        rows = torch.cat([tiny.make_inputs(SEQ, seed=s)["input_ids"] for s in range(2)]).tolist()
        calibration.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = _search_cli(capsys, "--model", str(directory), "--calibration", str(calibration), "--seq-len", str(SEQ),
                      "--batches", "1", "--keep", "2", "--save", str(tmp_path / "p.json"), "--out",
                      str(tmp_path / "s.png"))
    choice = PatternChoice.load(tmp_path / "p.json")
    assert choice.model_class == type(tiny.model).__name__ and choice.model_type == name
    assert choice.num_layers == 3 and choice.pattern.count("S") == 1 and choice.pattern in out
    assert choice.config_digest == config_digest(tiny.model)  # saving and loading leave the model's identity

    loaded = load_model_directory(directory)
    choice.check(loaded.model)
    model = loaded.model
    if name == "glm_moe_dsa":  # its config carries indexer_types (all "full"); the pattern file replaces them
        backend = IndexCacheEagerBackend.from_config(model.config, pattern_file=tmp_path / "p.json")
    else:
        backend = IndexCacheEagerBackend(pattern_file=tmp_path / "p.json")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    inputs = tiny.make_inputs(SEQ, seed=7)
    with torch.no_grad():
        got = compiled(**inputs, use_cache=False).logits
        with H.index_cache_oracle(model, choice.pattern) as sources:
            want = model(**inputs, use_cache=False).logits
        every_layer = model(**inputs, use_cache=False).logits
    assert sources  # the oracle shares: an S layer reads an F layer's indices
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, every_layer, atol=1e-4)  # the pattern changed what the model computes
    (report,) = backend.reports
    assert report.indexers_removed == 1


def test_a_pattern_file_refuses_to_compile_another_model_class(tmp_path, reference_search):
    """The backend sees which model it compiles: a file chosen for ReferenceDSAModel refuses another class."""
    from dsa_programs import ModuleDSA, inputs

    model, batches, choice = reference_search
    path = choice.save(tmp_path / "p.json")
    with torch.no_grad(), pytest.raises(Exception, match=r"pattern file is for model class 'ReferenceDSAModel'; "
                                                         r"the model being compiled is 'ModuleDSA'"):
        torch.compile(ModuleDSA(3), backend=IndexCacheEagerBackend(pattern_file=path))(inputs())
    with torch.no_grad():  # the class it was chosen for compiles
        torch.compile(model, backend=IndexCacheEagerBackend(pattern_file=path))(batches[0])
