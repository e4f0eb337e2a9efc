"""Wanda and SparseGPT: exact sparsity patterns, SparseGPT's error compensation, and prune_ on a model (experts
only by default, calibrated per expert, recorded, saved and loaded)."""

import pytest
import torch
from tiny_models import rel_err, tiny_model

import moekern
from moekern import surgery
from moekern.errors import MoekernError
from moekern.compression.slimming import PruneConfig, prune_
from moekern.compression.slimming.hessian import hessian
from moekern.compression.slimming.prune import sparsegpt, wanda


def correlated(t=512, k=64):
    return torch.randn(t, 8) @ torch.randn(8, k) + 0.1 * torch.randn(t, k)


def assert_pattern(w, sparsity=None, n=None, m=None):
    zeros = w == 0
    if n is None:
        assert bool((zeros.sum(dim=1) == round(sparsity * w.shape[1])).all())  # exactly, in every row
    else:
        kept = (~zeros).reshape(w.shape[0], -1, m).sum(dim=-1)
        assert bool((kept == n).all())  # exactly n non-zeros in every m


PATTERNS = [dict(sparsity=0.5), dict(sparsity=0.3), dict(n=2, m=4), dict(n=4, m=8)]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [64, 200])  # 200: two SparseGPT blocks, the second one partial
def test_exact_patterns(pattern, k):
    x, w = correlated(k=k), torch.randn(24, k)
    assert_pattern(wanda(w, x.pow(2).sum(0), **pattern), **pattern)
    assert_pattern(sparsegpt(w, hessian(x), **pattern), **pattern)


def test_wanda_keeps_the_largest_weight_times_input_norm():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([100.0, 1.0, 1.0, 0.01])  # ||x_k||^2: channel 0 is loud, channel 3 silent
    assert torch.equal(wanda(w, norms, sparsity=0.5), torch.tensor([[1.0, 0.0, 3.0, 0.0]]))
    assert torch.equal(wanda(w, None, sparsity=0.5), torch.tensor([[0.0, 0.0, 3.0, 4.0]]))  # magnitude


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(n=2, m=4)])
def test_sparsegpt_compensates_the_pruning_error(pattern):
    x, w = correlated(), torch.randn(32, 64)
    error = lambda pruned: ((x @ pruned.T - x @ w.T).norm() / (x @ w.T).norm()).item()  # noqa: E731
    assert error(sparsegpt(w, hessian(x), **pattern)) < 0.5 * error(wanda(w, x.pow(2).sum(0), **pattern))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(n=2, m=4)])
def test_prune_model_experts_only(method, pattern, tmp_path):
    model = tiny_model("qwen2_moe")
    shared_before = {n: p.clone() for n, p in model.named_parameters() if "shared_expert" in n}
    ids = torch.randint(3, 97, (4, 16))
    report = prune_(model, PruneConfig(method, **pattern), ids)
    assert report["fallback_magnitude"] == 0
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        for stacked in (experts.gate_up_proj, experts.down_proj):
            for w in stacked:
                assert_pattern(w, **pattern)
    assert all(torch.equal(p, shared_before[n]) for n, p in model.named_parameters() if "shared_expert" in n)
    record = surgery.decisions(model)["prune"]
    expected = {"method": method, "sparsity": 0.5} if "sparsity" in pattern else {"method": method, "n:m": "2:4"}
    assert record == expected
    moekern.save(model, tmp_path / "out")
    loaded, _ = moekern.load(tmp_path / "out")
    assert loaded.config.moekern["prune"] == record
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids).logits) <= 1e-5  # experts implementations may differ


def test_shared_experts_pruned_on_request():
    model = tiny_model("deepseek_v3")
    prune_(model, PruneConfig("wanda", n=2, m=4, prune_shared_experts=True), torch.randint(3, 97, (4, 16)))
    for layer in model.model.layers[1:]:  # layer 0 is dense: not an expert, not pruned
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert_pattern(getattr(layer.mlp.shared_experts, name).weight, n=2, m=4)
    assert not bool((model.model.layers[0].mlp.gate_proj.weight == 0).any())


@pytest.mark.parametrize("config, message", [
    (PruneConfig("wanda", n=2), "give both n and m"),
    (PruneConfig("wanda", n=4, m=4), "0 < n < m"),
    (PruneConfig("wanda", sparsity=1.0), "sparsity must be in"),
    (PruneConfig("obs"), "unknown pruning method"),
    (PruneConfig("sparsegpt", n=2, m=7), "not a multiple of m=7"),
])
def test_bad_prune_configs(config, message):
    with pytest.raises(MoekernError, match=message):
        prune_(tiny_model("mixtral", num_hidden_layers=1), config, torch.randint(3, 97, (2, 8)))
