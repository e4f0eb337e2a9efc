"""The reference of the routing sort step (routing.align_kernel's oracle), checked against its contract."""

import pytest
import torch

from moekern.ops.reference import align_block_size


@pytest.mark.parametrize("num_pairs,num_experts,block_m", [(0, 4, 16), (1, 8, 16), (37, 8, 16), (64, 3, 1), (500, 64, 32)])
def test_every_pair_once_grouped_by_expert_and_padded(num_pairs, num_experts, block_m):
    experts = torch.randint(-1, num_experts, (num_pairs,), dtype=torch.int32)  # -1: a skipped slot
    sorted_pairs, block_expert, num_padded = align_block_size(experts, num_experts, block_m)

    used = int(num_padded)
    assert used % block_m == 0 and sorted_pairs.numel() % block_m == 0
    assert (sorted_pairs[used:] == num_pairs).all() and (block_expert[used // block_m :] == -1).all()
    rows = sorted_pairs[:used].long()
    real = rows[rows < num_pairs]
    expected = torch.nonzero(experts >= 0).flatten()
    assert sorted(real.tolist()) == expected.tolist()  # each computed pair exactly once, skipped ones never
    for b in range(used // block_m):
        block = rows[b * block_m : (b + 1) * block_m]
        block = block[block < num_pairs]
        assert block.numel() > 0, "no block may be all padding"
        assert (experts[block] == block_expert[b]).all()
        assert (block.diff() > 0).all(), "pairs keep their order inside an expert"
    counts = torch.bincount(experts[experts >= 0].long(), minlength=num_experts)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())
