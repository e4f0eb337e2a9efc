"""What vLLM must build for each decoder layer of a moekern checkpoint, and moekern's routing for vLLM's FusedMoE.

A checkpoint's config.json records the decisions in the original numbering (config["moekern"]); its safetensors
header says how many experts each layer stores (compact after Expert Drop, or all of them with some masked). From
both, `layer_plans` gives one LayerPlan per decoder layer the checkpoint has. moekern.checkpoint.load reads the same
two facts the same way.

`MoekernRouting` is a vLLM custom routing function (hidden_states, gating_output, topk, renormalize) -> (topk_weights,
topk_ids) that applies moekern's own routing (moekern.ops.reference.route: every family's semantics in the original
expert space, masked experts, group-limited routers, then per-token skip) to a layer's stored experts. vLLM's fused
MoE computes every one of its k slots, so a skipped slot keeps its expert with weight 0 (same output, no saving), and
an empty slot (fewer eligible experts than k) gets an unused expert with weight 0.
"""

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moekern.errors import MoekernError

EXPERT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.[A-Za-z_]+\.experts\.(\d+)\.")  # hub layout: one linear per expert


@dataclass(frozen=True)
class LayerPlan:
    layer: int  # index in the checkpoint (after Block Drop)
    original: int  # index in the original model
    moe: bool  # the family's config makes this a routed MoE layer
    removed: bool  # Layer Drop: neither post-attention norm nor MoE
    rows: tuple[int, ...] = ()  # the original id of each stored expert
    alive: tuple[int, ...] = ()  # the original ids tokens may route to
    skip_beta: float | None = None
    top_k: int = 0  # slots vLLM computes: the config's top_k, or fewer where fewer experts are alive

    native_routing: bool = True  # vLLM's own router over the stored experts routes as moekern does


def stored_expert_counts(folder: str | Path) -> dict[int, int]:
    """{layer: number of experts stored} from the safetensors headers of a hub-layout folder (no tensor is read)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
              else sorted(p.name for p in folder.glob("*.safetensors")))
    counts: dict[int, int] = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():
                found = EXPERT_KEY.search(key)
                if found:
                    layer, expert = int(found.group(1)), int(found.group(2))
                    counts[layer] = max(counts.get(layer, 0), expert + 1)
    return counts


def layer_plans(config, stored: dict[int, int]) -> list[LayerPlan]:
    """One LayerPlan per decoder layer of a checkpoint with moekern decisions, from its config (in the family's
    class) and the experts each layer stores."""
    from moekern.models import family_of

    d = getattr(config, "moekern", None)
    if not d:
        raise MoekernError("the config has no moekern decisions (config.json['moekern'])")
    family = family_of(config)
    grouped = family.name.startswith("deepseek")
    num_original = d["original_num_experts"]
    top_k = config.num_experts_per_tok
    originals = [i for i in range(d["original_num_hidden_layers"]) if i not in d["dropped_blocks"]]
    if len(originals) != config.num_hidden_layers:
        raise MoekernError(f"config.json has {config.num_hidden_layers} layers but its moekern decisions leave "
                           f"{len(originals)}; the checkpoint is inconsistent")
    plans = []
    for layer, original in enumerate(originals):
        moe = family.is_moe_layer(config, layer)
        if not moe:
            plans.append(LayerPlan(layer, original, moe=False, removed=False))
            continue
        if original in d["dropped_moe_layers"]:
            plans.append(LayerPlan(layer, original, moe=True, removed=True))
            continue
        alive = tuple(d["kept_experts"][original] or range(num_original))
        on_disk = stored.get(layer)
        if on_disk == len(alive):
            rows = alive  # compact: the stored experts are the kept ones, in increasing id
        elif on_disk == num_original:
            rows = tuple(range(num_original))  # all stored, some masked
        else:
            raise MoekernError(f"layer {layer} stores {on_disk} experts; its decisions keep {len(alive)} of "
                               f"{num_original} (expected one of those counts): the checkpoint is inconsistent")
        skip_beta = d["skip_beta"][original]
        # vLLM's own router is moekern's where nothing is masked or skipped and the router over a subset of experts
        # does not depend on the missing ones (the softmax families; DeepSeek's groups and scores are defined over
        # the original experts, so any drop there takes moekern's routing)
        native = skip_beta is None and alive == rows and (not grouped or len(rows) == num_original)
        plans.append(LayerPlan(layer, original, moe=True, removed=False, rows=rows, alive=alive,
                               skip_beta=skip_beta, top_k=min(top_k, len(alive)), native_routing=native))
    return plans


class MoekernRouting(torch.nn.Module):
    """moekern's routing of one layer as a vLLM custom routing function, over the layer's stored experts.

    The routed scaling factor (DeepSeek) is left out of the weights: vLLM applies it to the routed output
    (apply_routed_scale_to_output), as it does for its own DeepSeek router."""

    def __init__(self, plan: LayerPlan, config, correction_bias: torch.Tensor | None = None):
        super().__init__()
        from moekern.models import family_of
        from moekern.ops.reference import NO_EXPERT

        d = config.moekern
        num_original = d["original_num_experts"]
        self.spec = replace(family_of(config).router_spec(config), scaling=1.0)
        self.top_k, self.skip_beta, self.no_expert = plan.top_k, plan.skip_beta, NO_EXPERT
        # DeepSeek-V3: the gate's parameter, filled when the weights load (in a tuple: not a parameter of this module)
        self._correction_bias = (correction_bias,)
        rows = torch.tensor(plan.rows, dtype=torch.long)
        row_of = torch.zeros(num_original, dtype=torch.long)
        row_of[rows] = torch.arange(len(plan.rows))
        alive = torch.zeros(num_original, dtype=torch.bool)
        alive[list(plan.alive)] = True
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("row_of", row_of, persistent=False)
        self.register_buffer("alive", alive, persistent=False)

    def forward(self, hidden_states, gating_output, topk, renormalize):
        from moekern.ops import reference

        logits = gating_output.float()
        tokens, num_rows = logits.shape[0], self.rows.numel()
        full = logits.new_full((tokens, self.alive.numel()), float("-inf")).index_copy(1, self.rows, logits)
        bias = self._correction_bias[0]
        if bias is not None:
            bias = full.new_zeros(self.alive.numel()).index_copy(0, self.rows, bias.float())
        weights, ids = reference.route(full, self.spec, self.alive, bias, None)
        weights, ids = weights[:, : self.top_k], ids[:, : self.top_k]  # empty slots sort last
        if self.skip_beta is not None and self.skip_beta > 0:
            weights, _ = reference.skip_weak_slots(weights, ids, self.skip_beta)  # the expert stays, weight 0
        empty = ids == self.no_expert
        row = self.row_of[ids.clamp(min=0)]
        # An empty slot gets a stored expert the token does not use (weight 0): distinct ids per token.
        used = torch.zeros(tokens, num_rows + 1, dtype=torch.bool, device=row.device)
        used.scatter_(1, row.masked_fill(empty, num_rows), True)
        free = (~used[:, :num_rows]).float().topk(self.top_k, dim=-1).indices
        filler = free.gather(1, (empty.long().cumsum(-1) - 1).clamp(min=0))
        row = torch.where(empty, filler, row)
        return weights.float(), row.to(torch.int32)
