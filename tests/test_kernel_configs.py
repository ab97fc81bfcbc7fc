"""Measured launch configurations as data: ``lightning_indexer.tuned_config`` reads what the sweep writes."""

import dataclasses
import json

from fx_indexcache.fuse.kernels import lightning_indexer as li

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


def test_without_measurements_the_rules_apply(tmp_path):
    li._tuned_rows.cache_clear()
    assert li.tuned_config("bf16", 1, 1024, 32768, 64, 128, CARD, tmp_path) is None
    assert li.card_file_name(CARD) == "logits_configs_NVIDIA_H100_80GB_HBM3.json"
    assert li.default_config(1, 1024, 32768, 64, 128).kind == "prefill"  # no CUDA here: the rules
