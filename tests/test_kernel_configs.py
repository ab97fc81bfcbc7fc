"""Measured launch configurations as data: ``lightning_indexer.tuned_config`` reads what the sweep writes."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fx_indexcache.fuse.kernels import lightning_indexer as li
from fx_indexcache.fuse.kernels import paged_decode as pd

CARD = "NVIDIA H100 80GB HBM3"


def _row(precision, kind, B, S, T, config):
    return dict(precision=precision, kind=kind, B=B, S=S, T=T, best=dataclasses.asdict(config), best_us=1.0)


def _write(directory, rows):
    (directory / li.card_file_name(CARD)).write_text(json.dumps(dict(rows=rows)))
    li._tuned_rows.cache_clear()


def test_the_nearest_measured_shape_of_the_same_kind_and_precision_is_used(tmp_path):
    small = li.LogitsConfig("prefill", 64, 128, 4, 3)
    large = li.LogitsConfig("prefill", 128, 256, 8, 4)
    fp8 = li.LogitsConfig("prefill", 64, 64, 4, 2)
    decode = li.LogitsConfig("decode", 1, 32, 2, 1)
    _write(tmp_path, [_row("bf16", "prefill", 1, 1024, 32768, small), _row("bf16", "prefill", 1, 1024, 131072, large),
                      _row("fp8", "prefill", 1, 1024, 32768, fp8), _row("bf16", "decode", 16, 1, 32768, decode)])
    tuned = lambda *shape, precision="bf16": li.tuned_config(precision, *shape, 64, 128, CARD, tmp_path)  # noqa: E731
    assert tuned(1, 1024, 40000) == small and tuned(1, 2048, 100000) == large
    assert tuned(1, 1024, 131072, precision="fp8") == fp8  # only fp8 rows serve fp8
    assert tuned(4, 1, 8192) == decode  # a decode shape never takes a prefill row
    assert li.tuned_config("bf16", 1, 1024, 32768, 32, 128, CARD, tmp_path) is None  # not V3.2's heads
    assert li.tuned_config("bf16", 1, 1024, 32768, 64, 128, "another card", tmp_path) is None


def test_the_rules_give_fp8_its_own_tiles_at_v32s_head_shape_only():
    """fp8's rules are the H100 fp8 sweeps' (key-rows decode, 64 x 128 prefill on 4 warps); bf16 keeps its own,
    and head shapes the fp8 sweeps did not cover keep the bf16 tiles."""
    bf16_decode, fp8_decode = li.rule_config(1, 1, 32768, 64, 128), li.rule_config(1, 1, 32768, 64, 128, precision="fp8")
    assert bf16_decode.kind == "decode" and fp8_decode.kind == "key_rows"
    assert li.rule_config(1, 1, 32768, 128, 128, precision="fp8") == li.rule_config(1, 1, 32768, 128, 128)
    fp8_prefill = li.rule_config(1, 1024, 32768, 64, 128, precision="fp8")
    assert fp8_prefill != li.rule_config(1, 1024, 32768, 64, 128) and fp8_prefill.kind == "prefill"
    assert li.rule_config(1, 12, 32768, 64, 128, precision="fp8").block_s == 4  # a few queries share a key tile


def test_without_measurements_the_rules_apply(tmp_path):
    li._tuned_rows.cache_clear()
    assert li.tuned_config("bf16", 1, 1024, 32768, 64, 128, CARD, tmp_path) is None
    assert li.card_file_name(CARD) == "logits_configs_NVIDIA_H100_80GB_HBM3.json"
    assert li.default_config(1, 1024, 32768, 64, 128).kind == "prefill"  # no CUDA here: the rules


def test_paged_rows_serve_the_paged_kernel_only(tmp_path):
    """The paged kernel's measurements (kind "paged", a decode config) are not the contiguous kernel's: each kind
    reads its own rows, and a config's key blocks survive the file."""
    contiguous = li.LogitsConfig("decode", 1, 128, 4, 3, key_blocks=4)
    paged = li.LogitsConfig("decode", 1, 64, 8, 2, key_blocks=8)
    _write(tmp_path, [_row("fp8", "decode", 1, 1, 32768, contiguous), _row("fp8", "paged", 1, 1, 32768, paged)])
    assert li.tuned_config("fp8", 2, 1, 32768, 64, 128, CARD, tmp_path) == contiguous
    assert li.tuned_config("fp8", 2, 1, 32768, 64, 128, CARD, tmp_path, kind="paged") == paged
    assert li.tuned_config("bf16", 2, 1, 32768, 64, 128, CARD, tmp_path, kind="paged") is None
    assert paged.name() == "decode-s1-t64-k8-w8-st2"
    with pytest.raises(ValueError, match="kind='pages'"):
        li.tuned_config("fp8", 2, 1, 32768, 64, 128, CARD, tmp_path, kind="pages")


def _sweep_module():
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(benchmarks))  # its sibling modules (bench_environment, bench_indexer_fp8)
    try:
        spec = importlib.util.spec_from_file_location("sweep_logits_configs", benchmarks / "sweep_logits_configs.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(benchmarks))
    return module


def test_short_rows_get_fewer_key_blocks_a_program():
    """Key blocks were measured on 32K-128K keys; on short rows the launch keeps two programs an SM."""
    eight = li.LogitsConfig("decode", 1, 64, 4, 2, key_blocks=8)
    assert li.fill_the_card(eight, 64, 32768, 132) == eight  # 64 rows x 64 programs: plenty
    short = li.fill_the_card(eight, 4, 4096, 132)  # 4 rows: 8 programs at 8 blocks, 64 at one
    assert short.key_blocks == 1 and dataclasses.replace(short, key_blocks=8) == eight
    assert li.fill_the_card(eight, 16, 8192, 132).key_blocks == 4  # 16 x 16 = 256 < 264 programs; 16 x 32 at four
    assert li.fill_the_card(li.LogitsConfig("key_rows", 1, 64, 4, 2), 1, 64, 132).key_blocks == 1


def test_a_launch_just_over_one_wave_leaves_the_top_k_its_sms(monkeypatch):
    """Under programmatic launch the decode top-k's blocks need free SMs to start under the logits: a launch just
    over one wave doubles its key blocks; one within a wave, one far over it, or one that cannot leave the rows
    their SMs stays as it is; and only a programmatic launch's measured config changes."""
    one = li.LogitsConfig("key_rows", 1, 128, 4, 2)
    assert li.leave_the_top_k_its_sms(one, 1, 32768, 132).key_blocks == 2  # 256 programs -> 128 <= 131
    assert li.leave_the_top_k_its_sms(one, 1, 8192, 132) == one  # 64 programs: SMs free already
    assert li.leave_the_top_k_its_sms(one, 1, 65536, 132) == one  # 512 programs: halving is not enough
    assert li.leave_the_top_k_its_sms(one, 64, 32768, 132) == one  # 64 rows x 256: far over
    assert li.leave_the_top_k_its_sms(one, 2, 16384, 132).key_blocks == 2  # 2 x 128 = 256 -> 128 <= 130
    assert li.leave_the_top_k_its_sms(one, 200, 128, 132) == one  # more rows than SMs
    tuned = dict(kind="key_rows", block_s=1, block_t=128, num_warps=4, num_stages=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(li, "tuned_config", lambda *a, **k: li.LogitsConfig(**tuned))
    monkeypatch.setattr(li, "device_sms", lambda device: 132)
    cuda = torch.device("cuda", 0)
    for allowed, blocks in ((True, 2), (False, 1)):
        monkeypatch.setattr(li.programmatic_launch, "allowed", lambda device, on=allowed: on)
        assert li.measured_config("bf16", 1, 1, 32768, 64, 128, cuda).key_blocks == blocks
        assert li.measured_config("bf16", 1, 1, 32768, 64, 128, cuda, kind="paged").key_blocks == 1


def test_the_sweep_merges_its_rows_into_a_card_file(tmp_path):
    """``--merge-into``: a shape measured again replaces its row, other rows stay, each row keeps its machine."""
    sweep = _sweep_module()
    path = tmp_path / li.card_file_name(CARD)
    old_env, new_env = dict(commit="old"), dict(commit="new")
    first = [dict(_row("fp8", "prefill", 1, 1024, 32768, li.LogitsConfig("prefill", 64, 128, 4, 3)), best_us=5.0),
             _row("fp8", "decode", 1, 1, 32768, li.LogitsConfig("decode", 1, 64, 4, 2))]
    sweep.merge_rows(path, old_env, first)
    again = dict(_row("fp8", "decode", 1, 1, 32768, li.LogitsConfig("decode", 1, 128, 4, 3, key_blocks=2)), best_us=0.5)
    sweep.merge_rows(path, new_env, [again])
    rows = json.loads(path.read_text())["rows"]
    assert [(r["kind"], r["env"]["commit"]) for r in rows] == [("prefill", "old"), ("decode", "new")]
    assert rows[1]["best"]["key_blocks"] == 2 and rows[0]["best_us"] == 5.0


def test_a_key_rows_row_round_trips_with_its_queries_per_dot(tmp_path):
    key_rows = li.LogitsConfig("key_rows", 64, 128, 8, 3, queries_per_dot=2)
    _write(tmp_path, [_row("fp8", "prefill", 1, 1024, 32768, key_rows)])
    assert li.tuned_config("fp8", 1, 1024, 65536, 64, 128, CARD, tmp_path) == key_rows
    assert key_rows.name() == "key_rows-s64-t128-q2-w8-st3"


def test_a_prefill_row_round_trips_with_its_heads_per_step(tmp_path):
    paired = li.LogitsConfig("prefill", 64, 128, 4, 3, heads_per_step=2)
    _write(tmp_path, [_row("fp8", "prefill", 1, 1024, 32768, paired)])
    assert li.tuned_config("fp8", 1, 1024, 131072, 64, 128, CARD, tmp_path) == paired
    assert paired.name() == "prefill-s64-t128-h2-w4-st3"


def test_the_sweep_can_be_restricted_to_a_neighbourhood():
    sweep = _sweep_module()
    restrict = sweep.parse_restrictions(["block_t=128", "num_warps=4", "block_s=64"])
    kept = [c for c in sweep.configs("prefill") if all(getattr(c, f) in v for f, v in restrict.items())]
    assert {c.heads_per_step for c in kept} == {1, 2} and {c.block_t for c in kept} == {128}
    with pytest.raises(ValueError, match="FIELD one of kind"):
        sweep.parse_restrictions(["blocks=4"])
    with pytest.raises(ValueError, match="block_t takes integers"):
        sweep.parse_restrictions(["block_t=big"])


@pytest.mark.parametrize("fields, named", [
    (dict(kind="rows"), "kind='rows'"),
    (dict(kind="key_rows", block_s=6, queries_per_dot=4), "queries_per_dot=4"),
    (dict(queries_per_dot=3), "queries_per_dot=3"),
    (dict(block_t=0), "block_t=0"),
    (dict(kind="prefill", key_blocks=2), "key_blocks=2"),
    (dict(kind="decode", key_blocks=0), "key_blocks=0"),
    (dict(kind="key_rows", block_s=4, key_blocks=2), "block_s=4 takes 1"),
    (dict(kind="prefill", heads_per_step=4), "heads_per_step=4"),
    (dict(kind="decode", heads_per_step=2), "heads_per_step=2: 1, or 2 for kind 'prefill'"),
])
def test_a_bad_config_names_its_field(fields, named):
    with pytest.raises(ValueError, match=named):
        li.LogitsConfig(**fields)


def test_every_committed_card_file_gives_valid_configs_for_its_rows():
    """What ``default_config`` reads on a card is committed data: each row names a precision and kind the
    kernels have, and its best config constructs (``LogitsConfig`` checks its fields), so a file cannot break
    a launch on the card it was measured on."""
    files = sorted(li.TUNED_CONFIGS.glob("logits_configs_*.json"))
    assert files, f"no measured configurations under {li.TUNED_CONFIGS}"
    for path in files:
        rows = json.loads(path.read_text())["rows"]
        assert rows, path
        for row in rows:
            assert row["precision"] in ("bf16", "fp8") and row["kind"] in li.TUNED_KINDS, (path.name, row)
            config = li.LogitsConfig(**row["best"])
            assert config.name() == row["best_name"], (path.name, row)
            if row["kind"] == "paged":  # the paged kernel's own rule: one query a program, heads or keys on M
                assert pd.paged_config_reason(config) is None, (path.name, row, pd.paged_config_reason(config))
            else:
                assert (config.kind == "decode") == (row["kind"] == "decode") or config.kind == "key_rows", (path.name, row)
            assert row["best_us"] <= row["default_us"], (path.name, row)


def test_on_a_measured_card_the_default_is_its_row_fitted_to_the_shape(monkeypatch):
    """What ``default_config`` and ``paged_config`` launch on the H100 (its committed file, read as on the card):
    the nearest measured row of the right kind and precision, with its key blocks cut where the rows are short."""

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: CARD)
    monkeypatch.setattr(li, "device_sms", lambda device: 132)
    rows = json.loads((li.TUNED_CONFIGS / li.card_file_name(CARD)).read_text())["rows"]

    def best(precision, kind, B, T):
        (row,) = [r for r in rows if (r["precision"], r["kind"], r["B"], r["T"]) == (precision, kind, B, T)]
        return li.LogitsConfig(**row["best"])

    assert li.default_config(1, 1, 32768, 64, 128, precision="fp8") == best("fp8", "decode", 1, 32768)
    assert li.default_config(1, 1024, 131072, 64, 128) == best("bf16", "prefill", 1, 131072)
    assert pd.paged_config(64, 1, 32768, 64, 128, "fp8") == best("fp8", "paged", 64, 32768)
    long_rows = best("bf16", "decode", 64, 32768)
    assert long_rows.key_blocks > 1
    short = li.default_config(64, 1, 1024, 64, 128)  # the same row, nearest to 64 rows, on rows of 1K keys
    assert short == dataclasses.replace(long_rows, key_blocks=short.key_blocks) and short.key_blocks < long_rows.key_blocks
    assert li.default_config(1, 1, 32768, 32, 128) == li.rule_config(1, 1, 32768, 32, 128)  # not V3.2's heads
