"""Import and export of the two published 4-bit checkpoint layouts, to and from moekern's layout (layout.py).

All three store, per linear y = x W^T with W [N, K] (N = out, K = in) and groups of G input channels,
W[n, k] = (q[n, k] - z[k // G, n]) * s[k // G, n] with 4-bit q and z. They differ in how nibbles are packed:

moekern   qweight int32 [K / 8, N]: bits 4j..4j+3 of qweight[r, n] hold q[n, 8r + j]      (packed along K)
          zeros uint8 [K / G, N] (unpacked), scales [K / G, N] in the activation dtype

AutoAWQ   "GEMM" version (WQLinear_GEMM), the format of AutoAWQ / llm-awq checkpoints and vLLM's awq kernels:
          qweight int32 [K, N / 8]: bits 4i..4i+3 of qweight[k, c] hold q[n = 8c + ORDER[i], k],
          ORDER = (0, 2, 4, 6, 1, 3, 5, 7)                                                  (packed along N)
          qzeros  int32 [K / G, N / 8]: the zeros packed the same way (stored as is)
          scales  fp16 [K / G, N]
          (dequantization in AutoAWQ: unpack, undo the order with (0, 4, 1, 5, 2, 6, 3, 7), (q - z) * s)

GPTQ      AutoGPTQ / GPTQModel / transformers "gptq" checkpoints (exllama, marlin, triton kernels):
          qweight int32 [K / 8, N]: bits 4j..4j+3 of qweight[r, n] hold q[n, 8r + j]      (= moekern's qweight)
          qzeros  int32 [K / G, N / 8]: bits 4j.. of qzeros[g, c] hold the zero of column n = 8c + j, in order;
                  checkpoint_format "gptq" (v1, the common one) stores zero - 1 (mod 16), "gptq_v2" the zero
          scales  fp16 [K / G, N]
          g_idx   int32 [K]: the group of input channel k (k // G without act-order)
  v1 caveats: a zero of 0 is stored as nibble 15; moekern reads it back as 0, the intended value (AutoGPTQ's old
  kernels read 16: the known v1 underflow). Exporting a zero of 0 to v1 is refused unless asked (allow_zero_v1),
  since other loaders read it differently; v2 has no such problem. Act-order checkpoints whose g_idx is not
  k // G (groups permuted, desc_act without static groups) are refused: moekern's layout has contiguous groups.

Every function accepts leading dimensions (stacked experts [E, ...]).
"""

import torch

from moekern.errors import MoekernError
from moekern.formats import layout

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SEQUENTIAL = tuple(range(8))


def pack_columns(values: torch.Tensor, order=SEQUENTIAL) -> torch.Tensor:
    """values [..., R, C] (0..15) -> int32 [..., R, C / 8]; nibble i of word c holds column 8c + order[i]."""
    *lead, rows, cols = values.shape
    if cols % layout.PACK:
        raise MoekernError(f"the packed width {cols} must be a multiple of 8")
    nibbles = values.to(torch.int32).reshape(*lead, rows, cols // layout.PACK, layout.PACK)[..., list(order)]
    return (nibbles << layout.SHIFTS.to(values.device)).sum(dim=-1, dtype=torch.int32)


def unpack_columns(packed: torch.Tensor, order=SEQUENTIAL) -> torch.Tensor:
    """The inverse of pack_columns: int32 [..., R, C / 8] -> uint8 [..., R, C]."""
    nibbles = (packed.unsqueeze(-1) >> layout.SHIFTS.to(packed.device)) & 0xF  # [..., R, C/8, 8]: nibble i
    out = torch.empty_like(nibbles)
    out[..., list(order)] = nibbles
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * layout.PACK).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# AutoAWQ GEMM
# ----------------------------------------------------------------------------------------------------------------------
def to_awq(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict:
    """moekern (qweight [K/8, N], scales, zeros) -> AutoAWQ GEMM {"qweight", "qzeros", "scales" (fp16)}."""
    q = layout.unpack(qweight)  # [..., N, K]
    return {
        "qweight": pack_columns(q.transpose(-1, -2), AWQ_ORDER),
        "qzeros": pack_columns(zeros, AWQ_ORDER),
        "scales": scales.to(torch.float16),
    }


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype=None) -> dict:
    """AutoAWQ GEMM -> moekern {"qweight", "scales", "zeros"}; scales cast to `dtype` (default: kept fp16)."""
    _check_shapes("AWQ", qweight.shape[-2], qweight.shape[-1] * layout.PACK, qzeros, scales)
    q = unpack_columns(qweight, AWQ_ORDER)  # [..., K, N]
    return {
        "qweight": layout.pack(q.transpose(-1, -2)),
        "scales": scales.to(dtype or scales.dtype),
        "zeros": unpack_columns(qzeros, AWQ_ORDER),
    }


# ----------------------------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------------------------
def to_gptq(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, version: int = 1,
            allow_zero_v1: bool = False) -> dict:
    """moekern -> GPTQ {"qweight", "qzeros", "scales" (fp16), "g_idx"} (checkpoint_format "gptq" for version 1,
    "gptq_v2" for 2)."""
    if version not in (1, 2):
        raise MoekernError(f"GPTQ checkpoint versions are 1 ('gptq') and 2 ('gptq_v2'), got {version}")
    stored = zeros.to(torch.int32)
    if version == 1:
        if not allow_zero_v1 and bool((stored == 0).any()):
            raise MoekernError(
                "a zero point of 0 cannot be stored in a GPTQ v1 checkpoint (it is stored minus 1, and loaders read "
                "nibble 15 back differently); export version=2 (checkpoint_format 'gptq_v2') or pass allow_zero_v1"
            )
        stored = (stored - 1) & 0xF
    k = qweight.shape[-2] * layout.PACK
    group = k // scales.shape[-2]
    g_idx = (torch.arange(k, device=qweight.device) // group).to(torch.int32)
    return {
        "qweight": qweight.clone(),
        "qzeros": pack_columns(stored),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx.expand(*qweight.shape[:-2], k).clone(),
    }


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None = None,
              version: int = 1, dtype=None) -> dict:
    """GPTQ -> moekern {"qweight", "scales", "zeros"}."""
    k, n = qweight.shape[-2] * layout.PACK, qweight.shape[-1]
    _check_shapes("GPTQ", k, n, qzeros, scales)
    group = k // scales.shape[-2]
    if g_idx is not None:
        expected = (torch.arange(k, device=g_idx.device) // group).to(g_idx.dtype)
        if not bool((g_idx == expected).all()):
            raise MoekernError(
                "this GPTQ checkpoint permutes its groups (act-order without static groups: g_idx is not k // "
                f"group_size = k // {group}); moekern's layout needs contiguous groups. Requantize with static groups"
            )
    zeros = unpack_columns(qzeros).to(torch.int32)
    if version == 1:
        zeros = (zeros + 1) & 0xF
    return {"qweight": qweight.clone(), "scales": scales.to(dtype or scales.dtype), "zeros": zeros.to(torch.uint8)}


def _check_shapes(fmt: str, k: int, n: int, qzeros: torch.Tensor, scales: torch.Tensor) -> None:
    groups = scales.shape[-2]
    if scales.shape[-1] != n or groups == 0 or k % groups or qzeros.shape[-2] != groups or qzeros.shape[-1] * 8 != n:
        raise MoekernError(
            f"inconsistent {fmt} tensors: weight in={k} out={n}, scales {tuple(scales.shape)}, "
            f"qzeros {tuple(qzeros.shape)}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Per-expert checkpoint tensors <-> moekern's stacked experts
# ----------------------------------------------------------------------------------------------------------------------
def import_experts(state: dict, prefix: str, num_experts: int, names=("gate_proj", "up_proj", "down_proj"),
                   fmt: str = "awq", version: int = 1, dtype=None) -> dict:
    """Stack an MoE layer's per-expert AWQ / GPTQ linears, as checkpoints store them
    (f"{prefix}.{e}.{name}.qweight", Mixtral: names=("w1", "w3", "w2")), into the buffers of
    moekern.modules.quant.QuantizedExperts (gate and up concatenated along N: gate_up = [gate; up])."""
    if fmt not in ("awq", "gptq"):
        raise MoekernError(f"unknown checkpoint format {fmt!r}; choose 'awq' or 'gptq'")

    def one(e, name):
        keys = ("qweight", "qzeros", "scales") + (("g_idx",) if fmt == "gptq" else ())
        found = {key: state.get(f"{prefix}.{e}.{name}.{key}") for key in keys}
        if any(v is None for k, v in found.items() if k != "g_idx"):
            raise MoekernError(f"the checkpoint has no {fmt.upper()} tensors for {prefix}.{e}.{name}")
        if fmt == "awq":
            return from_awq(found["qweight"], found["qzeros"], found["scales"], dtype)
        return from_gptq(found["qweight"], found["qzeros"], found["scales"], found["g_idx"], version, dtype)

    gate_name, up_name, down_name = names
    out = {}
    for part, parts in (("gate_up_proj", (gate_name, up_name)), ("down_proj", (down_name,))):
        per_expert = [[one(e, name) for name in parts] for e in range(num_experts)]
        for key in ("qweight", "scales", "zeros"):
            out[f"{part}_{key}"] = torch.stack([torch.cat([p[key] for p in ps], dim=-1) for ps in per_expert])
    return out


def export_experts(experts, prefix: str, names=("gate_proj", "up_proj", "down_proj"), fmt: str = "awq",
                   version: int = 1, allow_zero_v1: bool = False) -> dict:
    """The inverse of import_experts: a QuantizedExperts (without AWQ input scales, which the published formats have
    no place for) -> per-expert checkpoint tensors."""
    if any(name.endswith("input_scale") for name, _ in experts.named_buffers()):
        raise MoekernError("these experts carry AWQ input scales, which AutoAWQ / GPTQ checkpoints cannot hold")
    inter = experts.gate_up_proj_qweight.shape[-1] // 2
    out = {}
    for e in range(experts.num_experts):
        for part, splits in (("gate_up_proj", ((names[0], slice(0, inter)), (names[1], slice(inter, None)))),
                             ("down_proj", ((names[2], slice(None)),))):
            qweight, scales, zeros = (getattr(experts, f"{part}_{k}")[e] for k in ("qweight", "scales", "zeros"))
            for name, cols in splits:
                q, s, z = qweight[..., cols], scales[..., cols], zeros[..., cols]
                tensors = to_awq(q, s, z) if fmt == "awq" else to_gptq(q, s, z, version, allow_zero_v1)
                out.update({f"{prefix}.{e}.{name}.{k}": v.contiguous() for k, v in tensors.items()})
    return out
