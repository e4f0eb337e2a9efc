"""One calibration pass that records, per decoder layer (original numbering), everything the trimming methods need.

    stats = measure(model, ids)          # ids: LongTensor [n, L]; streams one decoder layer at a time
    stats.layers[3].s_nm                 # Layer Drop's similarity of layer 3

What is recorded for every decoder layer i with input x_i and output y_i (tokens t of all calibration blocks):
  block_similarity  mean_t cos(x_i[t], y_i[t])                                      Block Drop (paper, Fig. 7)
and for a layer with a routed MoE, with x' its post-attention residual (the input of the post-attention norm),
x = Norm(x') the MoE's input and MoE(x) its output (shared experts included):
  s_m               mean_t cos(x[t], MoE(x)[t])                                     the paper's S^(M), eq. 8
  s_nm              mean_t cos(x'[t], x'[t] + MoE(x)[t])                            the paper's S^(NM), eq. 9
  expert_scores     [E] mean_t of each expert's routing score over ALL (surviving) experts: the softmax probability
                    for softmax routers (Mixtral, Qwen, OLMoE, DeepSeek-V2) and for GPT-OSS (a softmax over all
                    logits, though GPT-OSS itself only softmaxes the top k); the sigmoid score for sigmoid routers
                    (DeepSeek-V3, without the correction bias, which only steers selection). Dropped experts score 0.
                    Indexed by original expert id. Expert Drop's importance (paper, App. A.3).
  expert_topk_scores  [E] mean_t of each expert's routing weight where the router chose it and 0 elsewhere: the mean
                    of the top-k routing weights, the score the authors' code ranks DeepSeek's experts by
                    (Unified-MoE-Compression, DeepseekExpertDropWrapper); Expert Drop's ":topk" option.
  weight_ratios     for each token, the routing weight of every non-top slot over the top slot's weight (top-2:
                    w2/w1), empty slots left out; a random sample of at most `max_ratios` per layer. Lu et al.'s beta.
  moe_inputs/outputs  x and MoE(x) on a random subset of at most `max_tokens` tokens per layer: enumeration pruning.
  alive             [E] bool: the experts still there.
With enumerate_keep=R (off by default), also Lu et al.'s enumeration loss of every subset of R surviving experts:
  subset_losses     (subsets, losses [C] float64): sum over the calibration batches b of ||Y_b - MoE_S(X_b)||_F, the
                    loss of Lu et al.'s code (Expert_Sparsity, PrunableMixtralSparseMoeBlockWrapper.enumerate), on
                    every calibration token; accumulated batch by batch, so no token is stored.
With block_tokens=N (off by default), also the block-wise similarity matrix (paper, Fig. 7):
  block_matrix      [B+1, B+1] mean_t cos(h_a[t], h_b[t]) where h_0 is the first block's input and h_{i+1} block i's
                    output (model order), over the same N evenly spaced calibration tokens for every block (all of
                    them if there are at most N); its first off-diagonal is block_similarity on those tokens.

The sums are accumulated in float64 over every calibration token; the subsets are uniform random samples (a random
key per token, the smallest keys kept), reproducible through `seed`.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moekern.compression.layerwise import stream_layers
from moekern.errors import MoekernError
from moekern.modules.experts import experts_forward
from moekern.models import family_of
from moekern.modules.moe import MoEBlock
from moekern.ops.reference import NO_EXPERT, route
from moekern.surgery import adopt, decisions, is_moe_block, original_layer_ids

CHUNK_FLOATS = 1 << 26  # per-expert outputs held at once (256 MB in fp32)
MAX_TOKENS = 4096  # MoE inputs/outputs kept per layer for enumeration pruning
MAX_RATIOS = 1 << 16  # routing-weight ratios kept per layer for beta


@dataclass
class LayerStats:
    layer: int  # original index
    block_similarity: float
    moe: bool = False  # False for a dense layer or one whose MoE was removed: the fields below are None
    s_m: float | None = None
    s_nm: float | None = None
    expert_scores: torch.Tensor | None = None
    expert_topk_scores: torch.Tensor | None = None
    alive: torch.Tensor | None = None
    weight_ratios: torch.Tensor | None = None
    moe_inputs: torch.Tensor | None = None
    moe_outputs: torch.Tensor | None = None
    subset_losses: tuple[list[list[int]], torch.Tensor] | None = None


@dataclass
class TrimStats:
    layers: dict[int, LayerStats]  # by original layer index, in model order
    tokens: int  # calibration tokens seen per layer
    # How the pass was made, so that an iterative method can measure the changed model the same way.
    calibration: torch.Tensor = field(repr=False)
    options: dict = field(default_factory=dict)
    block_matrix: torch.Tensor | None = None  # float64 [B+1, B+1] (module doc); None unless measured with block_tokens
    block_matrix_tokens: int = 0

    def moe_layers(self) -> list[int]:
        return [i for i, s in self.layers.items() if s.moe]

    def remeasure(self, model, **overrides) -> "TrimStats":
        return measure(model, self.calibration, **{**self.options, **overrides})

    def summary(self) -> dict:
        """The scalar figures (no tensors of tokens), for reports."""
        out = {}
        for i, s in self.layers.items():
            entry = {"block_similarity": s.block_similarity}
            if s.moe:
                entry.update(s_m=s.s_m, s_nm=s.s_nm, expert_scores=s.expert_scores.tolist(),
                             expert_topk_scores=s.expert_topk_scores.tolist(), alive=s.alive.tolist())
            out[str(i)] = entry
        return out


class _Sample:
    """A uniform random sample without replacement of at most `cap` rows of a stream of row batches: every row gets a
    random key and the `cap` smallest keys are kept."""

    def __init__(self, cap: int, generator: torch.Generator):
        self.cap, self.generator = cap, generator
        self.keys: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []

    def add(self, *tensors: torch.Tensor) -> None:
        keys = torch.rand(tensors[0].shape[0], generator=self.generator)
        tensors = [t.detach().float().cpu() for t in tensors]
        if self.keys is not None:
            keys = torch.cat([self.keys, keys])
            tensors = [torch.cat([old, new]) for old, new in zip(self.rows, tensors, strict=True)]
        if keys.numel() > self.cap:
            keep = keys.topk(self.cap, largest=False).indices
            keys, tensors = keys[keep], [t[keep] for t in tensors]
        self.keys, self.rows = keys, tensors


def router_view(block, family, num_original: int, x: torch.Tensor):
    """(logits [T, E], alive [E], correction bias [E] or None) of an MoE block for tokens x [T, H], in the original
    expert numbering: a dropped expert's logit is -inf and it is not alive (as MoEBlock.forward routes)."""
    router = getattr(block, family.router_attr)
    logits = family.router_logits(router, x).float()
    bias = family.correction_bias(router)
    if isinstance(block, MoEBlock):
        alive = block.alive
        if block.compact():
            full = logits.new_full((x.shape[0], num_original), float("-inf"))
            logits = full.index_copy_(1, block.kept_experts, logits)
            if bias is not None:
                bias = bias.new_zeros(num_original).index_copy_(0, block.kept_experts, bias)
    else:
        alive = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    return logits, alive.to(logits.device), bias


def subset_errors(block, family, num_original: int, x: torch.Tensor, y: torch.Tensor,
                  subsets: list[list[int]], spec=None) -> torch.Tensor:
    """||y - MoE_S(x)||_F for each subset S (original expert ids) of an MoE block (a MoEBlock, or the HF block it would
    wrap, whose experts are stored in original order; then `spec` is the family's RouterSpec), on tokens x [T, H]."""
    spec = spec or block.spec
    if isinstance(block, MoEBlock):
        expert_row = block.expert_row
        stored = block.kept_experts.numel()
    else:
        stored = num_original
        expert_row = torch.arange(num_original, device=x.device)
    chunk = max(1, CHUNK_FLOATS // (stored * x.shape[1]))
    masks = torch.zeros(len(subsets), num_original, dtype=torch.bool)
    for row, subset in enumerate(subsets):
        masks[row, subset] = True
    squared = torch.zeros(len(subsets), dtype=torch.float64)
    device = block.experts.gate_up_proj.device if hasattr(block.experts, "gate_up_proj") else x.device
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            xs = x[start : start + chunk].to(device)
            ys = y[start : start + chunk].to(device).float()
            logits, _, bias = router_view(block, family, num_original, xs)
            # every stored expert on every token, weight 1: [T, stored, H]
            outputs = torch.stack([
                experts_forward(block.experts, xs, torch.full((xs.shape[0], 1), row, device=device),
                                torch.ones(xs.shape[0], 1, device=device)).float()
                for row in range(stored)
            ], dim=1)
            shared = family.shared_output(block, xs)
            target = ys - (0 if shared is None else shared.float())
            for index in range(len(subsets)):
                weights, ids = route(logits, spec, masks[index].to(device), bias)
                rows = expert_row.to(device)[ids.clamp(min=0)].masked_fill(ids == NO_EXPERT, 0)
                picked = outputs.gather(1, rows[..., None].expand(-1, -1, outputs.shape[-1]))
                routed = (weights[..., None] * picked).sum(dim=1)  # empty slots have weight 0
                squared[index] += float(((target - routed) ** 2).sum())
    return squared.sqrt()


def routing_scores(logits: torch.Tensor, alive: torch.Tensor, scoring: str) -> torch.Tensor:
    """Each expert's score for each token [T, E] (see the module doc): softmax over the surviving experts, or the
    sigmoid for sigmoid routers; 0 for a dropped expert."""
    if scoring == "sigmoid":
        return torch.sigmoid(logits) * alive
    return torch.softmax(logits.masked_fill(~alive, float("-inf")), dim=-1)


def weight_ratios(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Routing weights [T, k] -> the ratio of every non-top filled slot to the token's top weight (flat)."""
    filled = ids != NO_EXPERT
    ordered, order = weights.masked_fill(~filled, -1.0).sort(dim=-1, descending=True)
    top = ordered[:, :1]
    ratios = ordered[:, 1:] / top.clamp_min(torch.finfo(top.dtype).tiny)
    keep = filled.gather(1, order)[:, 1:] & (top > 0)
    return ratios[keep]


class _BlockStates:
    """Unit-norm hidden states of a fixed subset of the calibration tokens (evenly spaced over the flattened [n, L]
    ids, the same tokens at every block), and the matrix of their mean cosines (Fig. 7)."""

    def __init__(self, total_tokens: int, cap: int):
        self.keep = torch.linspace(0, total_tokens - 1, min(cap, total_tokens)).round().long().unique()
        self.rows: dict[int, list[torch.Tensor]] = {}

    def add(self, position: int, offset: int, hidden: torch.Tensor) -> None:
        """The kept tokens among those at flat indices offset.. of this batch, at position (0: the first block's
        input, i+1: block i's output)."""
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        keep = self.keep[(self.keep >= offset) & (self.keep < offset + flat.shape[0])] - offset
        rows = F.normalize(flat[keep.to(flat.device)].double(), dim=-1).float().cpu()
        self.rows.setdefault(position, []).append(rows)

    def matrix(self) -> tuple[torch.Tensor, int]:
        states = [torch.cat(self.rows[p]) for p in sorted(self.rows)]
        size = len(states)
        out = torch.eye(size, dtype=torch.float64)
        for a in range(size):
            for b in range(a + 1, size):
                out[a, b] = out[b, a] = (states[a].double() * states[b].double()).sum(-1).mean()
        return out, states[0].shape[0] if states else 0


def _cosine_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(0, -2), b.double().flatten(0, -2), dim=-1).sum())


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class _LayerRecorder:
    """The hooks on one decoder layer and what they accumulate."""

    def __init__(self, layer, original: int, model, record_tokens: bool, max_tokens: int, max_ratios: int,
                 seed: int, position: int = 0, block_states: _BlockStates | None = None, enumerate_keep: int = 0):
        self.original, self.layer = original, layer
        self.position, self.block_states = position, block_states
        self.family = family_of(model)
        self.spec = self.family.router_spec(model.config)
        self.num_original = decisions(model)["original_num_experts"]
        self.moe = is_moe_block(layer.mlp)
        self.tokens = 0
        self.block_sum = 0.0
        self.s_m_sum = self.s_nm_sum = 0.0
        self.score_sum = self.topk_sum = None
        self.alive = None
        self.enumerate_keep, self.subsets, self.subset_losses = enumerate_keep, None, None
        self.residual = None
        generator = torch.Generator().manual_seed(seed * 1_000_003 + original)
        self.ratios = _Sample(max_ratios, generator)
        self.tokens_sample = _Sample(max_tokens, generator) if record_tokens else None
        self.block_input = None
        self.handles = [
            layer.register_forward_pre_hook(self._block_in, with_kwargs=True),
            layer.register_forward_hook(self._block_out),
        ]
        if self.moe:
            self.handles += [
                layer.post_attention_layernorm.register_forward_pre_hook(self._residual),
                layer.mlp.register_forward_hook(self._moe),
            ]

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def _block_in(self, module, args, kwargs):
        self.block_input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.block_states is not None and self.position == 0:
            self.block_states.add(0, self.tokens, self.block_input)

    def _block_out(self, module, args, output):
        y = _first(output)
        if self.block_states is not None:
            self.block_states.add(self.position + 1, self.tokens, y)
        self.block_sum += _cosine_sum(self.block_input, y)
        self.tokens += y.shape[:-1].numel()
        self.block_input = None

    def _residual(self, module, args):
        self.residual = args[0]

    def _moe(self, module, args, output):
        x = args[0].reshape(-1, args[0].shape[-1])
        y = _first(output).reshape(x.shape)
        residual = self.residual.reshape(x.shape)
        self.s_m_sum += _cosine_sum(x, y)
        self.s_nm_sum += _cosine_sum(residual, residual + y)
        logits, alive, bias = router_view(module, self.family, self.num_original, x)
        scores = routing_scores(logits, alive, self.spec.scoring).double().sum(dim=0).cpu()
        self.score_sum = scores if self.score_sum is None else self.score_sum + scores
        self.alive = alive.cpu()
        weights, ids = route(logits, self.spec, alive, bias)
        chosen = torch.zeros_like(logits, dtype=torch.float64).scatter_add_(
            1, ids.clamp(min=0), weights.double().masked_fill(ids == NO_EXPERT, 0.0)).sum(dim=0).cpu()
        self.topk_sum = chosen if self.topk_sum is None else self.topk_sum + chosen
        if self.enumerate_keep and int(alive.sum()) > self.enumerate_keep:
            self._enumerate(module, x, y, alive)
        ratios = weight_ratios(weights, ids)
        if ratios.numel():
            self.ratios.add(ratios)
        if self.tokens_sample is not None:
            self.tokens_sample.add(x, y)

    def _enumerate(self, module, x, y, alive) -> None:
        """Add this batch's ||Y_b - MoE_S(X_b)||_F to every subset's loss (Lu et al.)."""
        import itertools


        if self.subsets is None:
            survivors = alive.nonzero().flatten().tolist()
            self.subsets = [list(c) for c in itertools.combinations(survivors, self.enumerate_keep)]
            self.subset_losses = torch.zeros(len(self.subsets), dtype=torch.float64)
        self.subset_losses += subset_errors(module, self.family, self.num_original, x, y, self.subsets, self.spec)

    def result(self) -> LayerStats:
        n = max(self.tokens, 1)
        stats = LayerStats(self.original, self.block_sum / n, moe=self.moe and self.score_sum is not None)
        sums = {"block similarity": self.block_sum}
        if stats.moe:
            sums.update({"S(M)": self.s_m_sum, "S(NM)": self.s_nm_sum, "expert scores": float(self.score_sum.sum())})
        broken = [name for name, value in sums.items() if not math.isfinite(value)]
        if broken:  # the sums are reduced anyway: checking them costs nothing, and a NaN would choose the drops
            raise MoekernError(
                f"calibration statistics of layer {self.original} are not finite ({', '.join(broken)}): the model "
                f"produces NaN or inf on the calibration data. Check its weights (moekern info) and, in float16, "
                f"calibrate in bfloat16 or float32")
        if stats.moe:
            stats.s_m, stats.s_nm = self.s_m_sum / n, self.s_nm_sum / n
            stats.expert_scores = (self.score_sum / n).float()
            stats.expert_topk_scores = (self.topk_sum / n).float()
            if self.subsets is not None:
                stats.subset_losses = (self.subsets, self.subset_losses)
            stats.alive = self.alive
            stats.weight_ratios = self.ratios.rows[0] if self.ratios.rows else torch.zeros(0)
            if self.tokens_sample is not None:
                stats.moe_inputs, stats.moe_outputs = self.tokens_sample.rows
        return stats


def measure(
    model,
    calibration: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    record_tokens: bool = True,
    max_tokens: int = MAX_TOKENS,
    max_ratios: int = MAX_RATIOS,
    seed: int = 0,
    block_tokens: int = 0,
    enumerate_keep: int = 0,
) -> TrimStats:
    """One pass of `calibration` (LongTensor [n, L]) through the model, one decoder layer at a time (stream_layers,
    on `device`), recording the statistics of the module doc. record_tokens=False skips the MoE input/output samples
    (iterative Layer/Block Drop only need the similarities). block_tokens=N > 0 also records the block-wise
    similarity matrix on N calibration tokens (module doc); it changes none of the other statistics, and is not part
    of `options` (remeasure does not record it again). enumerate_keep=R > 0 also accumulates Lu et al.'s loss of
    every subset of R experts of each MoE layer (module doc; enumeration pruning's ":all")."""
    options = dict(batch_size=batch_size, device=device, record_tokens=record_tokens, max_tokens=max_tokens,
                   max_ratios=max_ratios, seed=seed, enumerate_keep=enumerate_keep)
    adopt(model)  # DeepSeek-MoE's remote blocks: moekern's layout (output unchanged)
    originals = original_layer_ids(model)
    recorders: list[_LayerRecorder] = []
    states = _BlockStates(calibration.numel(), block_tokens) if block_tokens > 0 else None
    try:
        # stream_layers runs a layer once after the loop body has seen it (to feed the next layer): the hooks stay
        # on until then, so each layer runs once per batch.
        for index, layer, _run in stream_layers(model, calibration, batch_size=batch_size, device=device):
            if recorders:
                recorders[-1].remove()
            recorder = _LayerRecorder(layer, originals[index], model, record_tokens, max_tokens, max_ratios, seed,
                                      index, states, enumerate_keep)
            recorders.append(recorder)
    finally:
        if recorders:
            recorders[-1].remove()
    layers = {r.original: r.result() for r in recorders}
    tokens = recorders[0].tokens if recorders else 0
    stats = TrimStats(layers, tokens, calibration, options)
    if states is not None:
        stats.block_matrix, stats.block_matrix_tokens = states.matrix()
    return stats
