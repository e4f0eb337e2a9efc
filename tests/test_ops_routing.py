"""Triton routing (moekern.ops.routing) equals its reference (reference.route, reference.align_block_size) on fresh
random inputs: every router family, dropped experts, all but k dropped, per-token skip, one token, odd sizes.
Outputs are poisoned before each launch, so an element the kernel does not write fails."""


import pytest
import torch

from moekern.ops import reference as R
from moekern.ops import routing


pytestmark = pytest.mark.usefixtures("on_test_device", "poisoned_kernel_outputs")



SPECS = {
    "mixtral": R.RouterSpec("softmax", 2, renormalize=True),
    "olmoe": R.RouterSpec("softmax", 3),  # no renormalisation
    "deepseek_v2": R.RouterSpec("softmax", 2, scaling=2.5, n_group=4, topk_group=2, group_score="max"),
    "deepseek_v3": R.RouterSpec("sigmoid", 3, renormalize=True, scaling=1.5, n_group=4, topk_group=2,
                                group_score="top2_sum"),
    "deepseek_v3_flat": R.RouterSpec("sigmoid", 2, renormalize=True, scaling=2.0),
    "gpt_oss": R.RouterSpec("topk_softmax", 2),
}


def check_route(logits, spec, alive=None, bias=None, beta=None):
    w_ref, ids_ref = R.route(logits, spec, alive, bias, beta)
    w, ids = routing.route(logits, spec, alive, bias, beta)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long(), ids_ref), (ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    assert (w[ids == R.NO_EXPERT] == 0).all()
    return w, ids


@pytest.mark.parametrize("family", list(SPECS))
@pytest.mark.parametrize("tokens,experts", [(1, 8), (19, 16)])
def test_route_equals_reference(family, tokens, experts):
    spec = SPECS[family]
    logits = torch.randn(tokens, experts) * 2
    alive = torch.rand(experts) > 0.3
    alive[torch.randperm(experts)[: spec.top_k]] = True
    bias = torch.randn(experts) * 0.3 if spec.scoring == "sigmoid" else None
    for a in (None, alive):
        for beta in (None, 0.6):
            check_route(logits, spec, a, bias, beta)


@pytest.mark.parametrize("family,experts", [("deepseek_v2", 20), ("deepseek_v3", 60), ("mixtral", 60)])
def test_expert_counts_that_are_not_powers_of_two(family, experts):
    """Qwen1.5-MoE has 60 experts, DeepSeek-V2 160 in 8 groups: padding columns and odd group sizes."""
    spec = SPECS[family]
    logits = torch.randn(11, experts)
    alive = torch.rand(experts) > 0.25
    bias = torch.randn(experts) * 0.3 if spec.scoring == "sigmoid" else None
    check_route(logits, spec, alive, bias, 0.3)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_all_but_k_dropped_and_fewer_than_k(family):
    spec = SPECS[family]
    experts = 16
    logits = torch.randn(9, experts)
    bias = torch.randn(experts) * 0.3 if spec.scoring == "sigmoid" else None
    for survivors in (spec.top_k, 1):  # exactly k survive; then fewer than k: the extra slots are empty
        alive = torch.zeros(experts, dtype=torch.bool)
        alive[torch.randperm(experts)[:survivors]] = True
        w, ids = check_route(logits, spec, alive, bias)
        assert ((ids >= 0).sum(dim=1) == survivors).all()
        assert alive[ids[ids >= 0].long()].all(), "a dropped expert was chosen"


def test_skip_every_slot_but_the_top():
    """beta = 1: only each token's top slot stays (ties aside), and it carries the k weights' sum."""
    logits = torch.randn(7, 8)
    spec = SPECS["olmoe"]
    w, ids = check_route(logits, spec, beta=1.0)
    assert ((ids >= 0).sum(dim=1) == 1).all()
    w_full, _ = R.route(logits, spec)
    torch.testing.assert_close(w.sum(dim=1), w_full.sum(dim=1))


@pytest.mark.parametrize("num_pairs,num_experts,block_m", [(0, 4, 16), (1, 8, 1), (37, 8, 16), (64, 3, 1),
                                                            (300, 24, 8), (500, 64, 32)])
def test_align_equals_reference(num_pairs, num_experts, block_m):
    experts = torch.randint(-1, num_experts, (num_pairs,), dtype=torch.int32)  # -1: a skipped slot
    if num_pairs > 10:
        experts[experts == 1] = -1  # an expert nobody routes to (an empty or dropped expert)
    expected = R.align_block_size(experts, num_experts, block_m)
    got = routing.align_block_size(experts, num_experts, block_m)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_route_then_align_launches_nothing_for_dropped_or_skipped():
    spec = SPECS["mixtral"]
    experts, block_m = 8, 4
    alive = torch.ones(experts, dtype=torch.bool)
    alive[[2, 5]] = False
    _, ids = routing.route(torch.randn(33, experts), spec, alive, skip_beta=0.5)
    sorted_pairs, block_expert, num_padded = routing.align_block_size(ids, experts, block_m)
    used = block_expert[block_expert >= 0]
    assert not (used == 2).any() and not (used == 5).any()
    flat = ids.reshape(-1)
    real = sorted_pairs[sorted_pairs < flat.numel()].long()
    assert (flat[real] >= 0).all() and real.numel() == int((flat >= 0).sum())
    assert int(num_padded) == block_m * used.numel()


def test_align_ignores_ids_past_the_experts():
    """An id >= num_experts names no expert: align leaves it out like a negative id (the slot sum reads it as 0)."""
    experts = torch.randint(-1, 12, (200,), dtype=torch.int32)  # 8 experts: 8..11 name none
    clean = experts.masked_fill(experts >= 8, -1)
    for g, e in zip(routing.align_block_size(experts, 8, 4), R.align_block_size(clean, 8, 4), strict=True):
        assert torch.equal(g, e)


@pytest.mark.parametrize("num_pairs,num_experts,block_m", [(1, 256, 16), (8, 256, 16), (128, 128, 16), (500, 7, 32),
                                                            (64, 8, 128)])
def test_max_blocks_bounds_every_routing(num_pairs, num_experts, block_m):
    """The GEMM grids launch max_blocks blocks, not max_padded_rows / block_m: no routing uses more (here the worst:
    every expert's run ending one pair into a block), and align marks every block past it -1."""
    bound = routing.max_blocks(num_pairs, num_experts, block_m)
    reached = min(num_experts, num_pairs)
    per = torch.full((reached,), num_pairs // reached)
    per[: num_pairs % reached] += 1
    worst = int(((per + block_m - 1) // block_m).sum())
    assert worst <= bound <= routing.max_padded_rows(num_pairs, num_experts, block_m) // block_m
    experts = torch.repeat_interleave(torch.arange(reached, dtype=torch.int32), per)
    _, block_expert, _ = routing.align_block_size(experts, num_experts, block_m)
    assert (block_expert[bound:] == -1).all() and int((block_expert >= 0).sum()) == worst


def test_deepseek_v3_router_at_its_real_size():
    """256 experts in 8 groups, top 4 groups, top 8, sigmoid with correction bias, some experts dropped: the shape
    that needed 255 registers a program at 16 tokens, now 8 tokens over 8 warps."""
    spec = R.RouterSpec("sigmoid", 8, renormalize=True, scaling=2.5, n_group=8, topk_group=4, group_score="top2_sum")
    logits, bias = torch.randn(13, 256), torch.randn(256) * 0.1
    alive = torch.rand(256) > 0.1
    check_route(logits, spec, alive, bias, 0.2)


def test_route_maps_ids_to_storage_rows_in_the_same_launch():
    """After Expert Drop sliced the weights, expert_row maps original ids to stored rows inside the route kernel;
    equal to the reference's ids mapped on the host (what MoEBlock does with four more launches)."""
    spec = SPECS["deepseek_v3"]
    experts = 16
    alive = torch.ones(experts, dtype=torch.bool)
    alive[[2, 5, 11]] = False
    kept = torch.nonzero(alive).flatten()
    expert_row = torch.full((experts,), R.NO_EXPERT, dtype=torch.long)
    expert_row[kept] = torch.arange(kept.numel())
    logits, bias = torch.randn(21, experts), torch.randn(experts) * 0.3
    w_ref, ids_ref = R.route(logits, spec, alive, bias, 0.4)
    rows_ref = expert_row[ids_ref.clamp(min=0)].masked_fill(ids_ref == R.NO_EXPERT, R.NO_EXPERT)
    w, rows = routing.route(logits, spec, alive, bias, 0.4, expert_row=expert_row)
    assert rows.dtype == torch.int32 and torch.equal(rows.long(), rows_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
