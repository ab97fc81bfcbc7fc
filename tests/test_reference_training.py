"""The training-only path of the reference model (``reference.training``) and the training script's smoke run.

A tiny random model: the point is the wiring (which loss reaches which weights, dense vs sparse attention),
not quality. The shipped checkpoint's own tests are in ``test_trained_checkpoint.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel
from fx_indexcache.models.reference.checkpoint import load_checkpoint
from fx_indexcache.models.reference.training import Attention, attention_kl, next_byte_loss, training_forward

ROOT = Path(__file__).resolve().parents[1]


def tiny(topk: int = 8) -> ReferenceDSAModel:
    config = DSAModelConfig.tiny(vocab_size=256, num_layers=3, index_topk=topk, dense_mlp_instead_of_moe=True,
                                 max_seq_len=64)
    return ReferenceDSAModel(config, seed=3)


def ids(length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(0))


def test_sparse_training_forward_is_the_inference_forward():
    model, x = tiny(), ids()
    with torch.no_grad():
        out = training_forward(model, x, Attention.SPARSE)
        torch.testing.assert_close(out.logits, model(x), rtol=0, atol=0)
        dense = training_forward(model, x, Attention.DENSE).logits
    assert (dense - out.logits).abs().max() > 1e-3  # top-8 of up to 32 keys: dense attention differs


def test_dense_attention_equals_sparse_once_top_k_covers_every_key():
    model, x = tiny(topk=64), ids()
    with torch.no_grad():
        dense = training_forward(model, x, Attention.DENSE).logits
        sparse = training_forward(model, x, Attention.SPARSE).logits
    torch.testing.assert_close(dense, sparse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", list(Attention))
def test_lm_loss_trains_the_model_and_kl_trains_only_the_indexers(attention):
    model, x = tiny().train(), ids()
    out = training_forward(model, x, attention)
    lm_grads = torch.autograd.grad(next_byte_loss(out.logits, x), list(model.parameters()), retain_graph=True,
                                   allow_unused=True)
    kl_grads = torch.autograd.grad(out.indexer_kl, list(model.parameters()), allow_unused=True)
    names = [name for name, _ in model.named_parameters()]

    def touched(grads):
        return {name for name, g in zip(names, grads) if g is not None and g.abs().sum() > 0}

    indexer = {name for name in names if ".indexer." in name}
    assert touched(kl_grads) == indexer  # every indexer weight learns from the KL, nothing else does
    assert not touched(lm_grads) & indexer and len(touched(lm_grads)) > len(names) // 2


def test_attention_kl_is_zero_at_the_target_and_ignores_masked_keys():
    target = torch.tensor([[0.5, 0.5, 0.0]])
    assert attention_kl(target, torch.tensor([[1.0, 1.0, float("-inf")]])).item() == pytest.approx(0.0, abs=1e-7)
    assert attention_kl(target, torch.tensor([[2.0, 0.0, float("-inf")]])).item() > 0.1


def test_training_forward_refuses_a_pattern_and_an_unknown_mode():
    model = tiny()
    with pytest.raises(ValueError, match="attention="):
        training_forward(model, ids(), "dense")
    model.set_index_cache_pattern("FSF")
    with pytest.raises(ValueError, match="pattern"):
        training_forward(model, ids(), Attention.DENSE)


def test_training_script_smoke_run_writes_a_loadable_checkpoint(tmp_path):
    script = ROOT / "scripts" / "train_reference.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--no-table", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "train_log.txt").read_text()
    assert "dense" in log and "sparse" in log  # both stages ran
    model = load_checkpoint(tmp_path / "model.safetensors")
    assert model.config.vocab_size == 256 and model.checkpoint_metadata["steps"] == "6"
    assert (tmp_path / "train_loss.png").stat().st_size > 1000
