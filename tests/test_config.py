"""The config table: semantics identical to vLLM/SGLang, every precedence rule, every bad value."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fx_indexcache import IndexCacheConfig


def on(**keys):
    return IndexCacheConfig(use_index_cache=True, **keys)


def test_v32_freq4_marks_16_of_61_layers_full():
    pattern = on(index_topk_freq=4).pattern_for(61)
    full = [i for i, c in enumerate(pattern) if c == "F"]
    assert full == [0, 1, *range(5, 58, 4)]
    assert len(full) == 16 and pattern.count("S") == 45


@given(freq=st.integers(1, 9), offset=st.integers(1, 9), layer=st.integers(0, 200))
def test_freq_offset_formula_matches_vllm(freq, offset, layer):
    expected = "F" if max(layer - offset + 1, 0) % freq == 0 else "S"
    assert on(index_topk_freq=freq, index_skip_topk_offset=offset).layer_kind(layer) == expected


def test_defaults_compute_every_layer():
    assert IndexCacheConfig().pattern_for(8) == "F" * 8
    assert on().pattern_for(8) == "F" * 8  # freq 1


def test_use_index_cache_false_ignores_everything_else():
    config = IndexCacheConfig(use_index_cache=False, index_topk_freq=4, index_topk_pattern="FSSS")
    assert config.pattern_for(4) == "FFFF"


def test_pattern_overrides_freq_and_offset():
    assert on(index_topk_freq=4, index_topk_pattern="FSFS").pattern_for(4) == "FSFS"


def test_indexer_types_override_pattern():
    config = on(index_topk_pattern="FFFF", indexer_types=["full", "shared", "shared", "full"])
    assert config.pattern_for(4) == "FSSF"


def test_source_layer_is_nearest_preceding_full():
    config = on(index_topk_pattern="FSSFSF")
    assert config.source_layer(0) is None and config.source_layer(5) == 3
    assert config.source_layer(1) == 0 and config.source_layer(2) == 0 and config.source_layer(4) == 3
    assert on(index_topk_pattern="SSF").source_layer(1) is None


def test_from_hf_config_reads_dict_object_and_text_config():
    overrides = {"use_index_cache": True, "index_topk_freq": 4}
    assert IndexCacheConfig.from_hf_config(overrides).index_topk_freq == 4

    class Text:
        use_index_cache = True
        index_topk_pattern = "FS"
        num_hidden_layers = 2

    class Outer:
        text_config = Text()

    config = IndexCacheConfig.from_hf_config(Outer())
    assert config.pattern_for(2) == "FS" and config.num_layers == 2


def test_from_hf_config_with_transformers_config():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV32Config(num_hidden_layers=4, use_index_cache=True, index_topk_freq=2)
    config = IndexCacheConfig.from_hf_config(hf)
    assert config.num_layers == 4
    assert config.pattern_for(4) == on(index_topk_freq=2).pattern_for(4)


def test_backend_options_default_to_the_papers_quarter():
    config, rest = IndexCacheConfig.from_options({"max_autotune": False})
    assert config.use_index_cache and config.index_topk_freq == 4
    assert rest == {"max_autotune": False}
    config, _ = IndexCacheConfig.from_options({"index_topk_pattern": "FS"})
    assert config.index_topk_freq == 1 and config.pattern_for(2) == "FS"


@pytest.mark.parametrize(
    "keys, field, allowed",
    [
        ({"index_topk_freq": 0}, "index_topk_freq", "int >= 1"),
        ({"index_topk_freq": -2}, "index_topk_freq", "int >= 1"),
        ({"index_topk_freq": 2.0}, "index_topk_freq", "int >= 1"),
        ({"index_topk_freq": True}, "index_topk_freq", "int >= 1"),
        ({"index_skip_topk_offset": 0}, "index_skip_topk_offset", "int >= 1"),
        ({"index_skip_topk_offset": "2"}, "index_skip_topk_offset", "int >= 1"),
        ({"index_topk_pattern": "FSX"}, "index_topk_pattern", "'F' and 'S'"),
        ({"index_topk_pattern": "fs"}, "index_topk_pattern", "'F' and 'S'"),
        ({"index_topk_pattern": ""}, "index_topk_pattern", "non-empty"),
        ({"index_topk_pattern": ["F", "S"]}, "index_topk_pattern", "string"),
        ({"indexer_types": ["full", "sparse"]}, "indexer_types", "'sparse'"),
        ({"indexer_types": []}, "indexer_types", "non-empty"),
        ({"indexer_types": "full"}, "indexer_types", "list"),
        ({"use_index_cache": "yes"}, "use_index_cache", "bool"),
        ({"index_topk_pattern": "FSF", "num_layers": 4}, "index_topk_pattern", "4 entries, not 3"),
        ({"indexer_types": ["full"], "num_layers": 2}, "indexer_types", "2 entries, not 1"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(keys, field, allowed):
    with pytest.raises(ValueError) as error:
        IndexCacheConfig(**keys)
    message = str(error.value)
    assert field in message and allowed in message
    assert repr(next(iter(keys.values()))) in message


def test_pattern_too_short_for_the_graph_names_the_key():
    config = on(index_topk_pattern="FS")
    with pytest.raises(ValueError, match=r"index_topk_pattern='FS' has 2 entries but the model has at least 3 decoder layers"):
        config.layer_kind(2)


def test_fingerprint_changes_with_every_field():
    base = on(index_topk_freq=4)
    variants = [
        on(index_topk_freq=2),
        on(index_topk_freq=4, index_skip_topk_offset=3),
        on(index_topk_freq=4, index_topk_pattern="FS"),
        on(index_topk_freq=4, drop_shared_indexer_cache_writes=True),
        IndexCacheConfig(index_topk_freq=4, use_index_cache=False),
    ]
    assert len({base.fingerprint(), *(v.fingerprint() for v in variants)}) == 1 + len(variants)


def test_executed_pattern_follows_the_one_buffer_rule():
    """The first S layer with nothing computed before it computes; the next S reads it (the buffer it wrote)."""
    assert on(index_topk_pattern="SSFSF").executed_pattern(5) == "FSFSF"
    assert on(index_topk_freq=4).executed_pattern(8) == on(index_topk_freq=4).pattern_for(8)


@pytest.mark.parametrize(("indexed", "expected"), [
    ([1, 3, 5, 7], {1: 1, 3: 1, 5: 5, 7: 5}),  # the hybrid: DSA at odd layers, freq 4 -> 3<-1, 7<-5
    ([2, 4, 6, 8, 10], {2: 2, 4: 2, 6: 2, 8: 2, 10: 2}),  # F-marked 5 and 9 hold no indexer: all read 2
    ([0, 5, 6], {0: 0, 5: 5, 6: 5}),
])
def test_buffer_sources_pair_hybrid_stacks_by_the_global_decoder_index(indexed, expected):
    assert on(index_topk_freq=4).buffer_sources(indexed) == expected


# ----------------------------------------------------------------------------- issue 11, item 9
def test_glm52_config_runs_the_engines_pattern_without_use_index_cache():
    """GLM-5.2 ships freq 4 / offset 3 and no use_index_cache; vLLM and SGLang apply it: 78 layers → 21 F."""
    from fx_indexcache.config import PatternSource, Switch

    glm = {"num_hidden_layers": 78, "index_topk_freq": 4, "index_skip_topk_offset": 3}
    config = IndexCacheConfig.from_hf_config(glm)
    pattern = config.pattern_for(78)
    assert config.use_index_cache and config.switch is Switch.IMPLIED_BY_KEYS
    assert pattern.count("F") == 21 and pattern[:7] == "FFFSSSF"
    assert pattern == "".join("F" if max(i - 2, 0) % 4 == 0 else "S" for i in range(78))
    assert config.pattern_source is PatternSource.FREQ_OFFSET


def test_explicit_use_index_cache_false_still_turns_it_off_and_warns(caplog):
    from fx_indexcache.config import PatternSource

    with caplog.at_level("WARNING", logger="fx_indexcache"):
        config = IndexCacheConfig.from_hf_config({"use_index_cache": False, "index_topk_freq": 4, "num_hidden_layers": 8})
    assert not config.use_index_cache and config.pattern_for(8) == "F" * 8
    assert config.pattern_source is PatternSource.OFF
    (record,) = [r for r in caplog.records if "vLLM and SGLang" in r.getMessage()]
    assert "FFSSSFSS" in record.getMessage()


def test_a_model_config_without_index_keys_stays_off():
    from fx_indexcache.config import Switch

    config = IndexCacheConfig.from_hf_config({"num_hidden_layers": 4})
    assert not config.use_index_cache and config.switch is Switch.DEFAULT


def test_a_pass_given_no_keys_reports_the_default_not_a_given_switch():
    from fx_indexcache import IndexCachePass
    from fx_indexcache.config import Switch

    config = IndexCachePass().config
    assert not config.use_index_cache and config.switch is Switch.DEFAULT
    assert IndexCacheConfig.from_keys(use_index_cache=False).switch is Switch.GIVEN


@pytest.mark.parametrize(
    "keys, expected, source",
    [
        ({"indexer_types": ["full", "shared", "full"], "index_topk_pattern": "FFS", "index_topk_freq": 2},
         "FSF", "INDEXER_TYPES"),
        ({"index_topk_pattern": "FFS", "index_topk_freq": 2}, "FFS", "INDEX_TOPK_PATTERN"),
        ({"index_topk_freq": 2}, "FFS", "FREQ_OFFSET"),  # no offset: max(i-1, 0) % freq, same as offset 2
    ],
)
def test_sglang_precedence_from_a_model_config(keys, expected, source):
    from fx_indexcache.config import PatternSource

    config = IndexCacheConfig.from_hf_config({**keys, "num_hidden_layers": 3})
    assert config.use_index_cache and config.pattern_for(3) == expected
    assert config.pattern_source is PatternSource[source]


def test_mtp_layers_compute_in_the_base_config():
    """vLLM numbers MTP layers past the backbone and always builds their indexer."""
    config = IndexCacheConfig.from_hf_config({"index_topk_pattern": "FFSS", "num_hidden_layers": 4})
    assert [config.layer_kind(i) for i in range(6)] == list("FFSSFF")
    assert config.source_layer(5) == 4


def test_report_says_where_the_pattern_came_from():
    from fx_indexcache import IndexCacheReport
    from fx_indexcache.config import PatternSource
    from fx_indexcache.detection.registry import LayerSource

    config = IndexCacheConfig.from_hf_config({"indexer_types": ["full", "shared"]})
    report = IndexCacheReport(config, [], LayerSource.NO_SITES, 0)
    assert report.pattern_source is PatternSource.INDEXER_TYPES
    assert "pattern from indexer_types" in report.format() and "implied by the IndexCache keys" in report.format()


def test_fuse_indexer_kernel_defaults_to_when_index_cache_is_on():
    assert IndexCacheConfig().fuse_indexer_kernel is None and not IndexCacheConfig().fuses_kernel
    assert on().fuses_kernel and IndexCacheConfig(fuse_indexer_kernel=True).fuses_kernel
    assert not on(fuse_indexer_kernel=False).fuses_kernel
    with pytest.raises(ValueError, match="fuse_indexer_kernel='yes'"):
        IndexCacheConfig(fuse_indexer_kernel="yes")
