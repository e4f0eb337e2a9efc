"""A published 4-bit folder's format, per tensor: its quantization_config (AutoAWQ "awq" version "gemm"; GPTQ "gptq"
with checkpoint_format "gptq" or "gptq_v2"), the transformers 4 names its tensors carry, and one 4-bit linear read,
checked against the format and converted to moekern's layout. Whole folders: moekern.quantized_folders."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moekern.errors import MoekernError
from moekern.formats import layout, published

AWQ_VERSIONS = ("gemm",)
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 2}
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # gate, up, down; every other family: gate_proj, up_proj, down_proj
MOE_PREFIX = {"mixtral": "block_sparse_moe"}  # the MoE block's name in transformers 4 checkpoints; others: mlp
DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class HubQuant:
    """A folder's quantization_config, checked. version: GPTQ's 1 ("gptq") or 2 ("gptq_v2"); AWQ: 1."""

    method: str  # "awq" or "gptq"
    group_size: int  # -1: one group over the whole input width
    version: int = 1
    desc_act: bool = False
    sym: bool = False

    @property
    def format(self) -> str:
        return "awq-gemm" if self.method == "awq" else ("gptq" if self.version == 1 else "gptq_v2")


def read_quantization_config(config: dict) -> HubQuant | None:
    """The checked quantization_config of a config.json dict; None when it has none."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise MoekernError(f"quantization_config must be a JSON object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("awq", "gptq"):
        raise MoekernError(
            f"quantization_config.quant_method {qc.get('quant_method')!r} is not supported; moekern reads AutoAWQ "
            f"('awq', version 'gemm') and GPTQ ('gptq') checkpoints"
        )
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise MoekernError(f"this {method.upper()} checkpoint has bits={bits!r}; moekern reads 4-bit checkpoints only")
    group = qc.get("group_size", qc.get("q_group_size"))
    if group != -1 and not layout.valid_group_size(group):
        raise MoekernError(f"quantization_config.group_size must be -1 or a positive multiple of {layout.PACK}, got "
                           f"{group!r}")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version not in AWQ_VERSIONS:
            raise MoekernError(
                f"AWQ version {qc.get('version')!r} is not supported: moekern reads the 'gemm' layout "
                f"(WQLinear_GEMM) only; GEMV, Marlin and exllama AWQ layouts pack differently"
            )
        if not qc.get("zero_point", True):
            raise MoekernError("AWQ checkpoints without zero points (zero_point: false) are not supported")
        return HubQuant("awq", group)
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in GPTQ_FORMATS:
        raise MoekernError(
            f"GPTQ checkpoint_format {qc.get('checkpoint_format')!r} is not supported; moekern reads "
            f"{', '.join(repr(f) for f in GPTQ_FORMATS)} (the Marlin / BitBLAS repackings are not)"
        )
    return HubQuant("gptq", group, GPTQ_FORMATS[fmt], bool(qc.get("desc_act", False)), bool(qc.get("sym", True)))


def is_quantized_folder(path: str | Path) -> bool:
    """Whether a local folder's config.json has an AWQ / GPTQ quantization_config (what load_quantized_folder reads;
    other quant_methods are not, so a caller can dispatch on this and let transformers fail on the rest)."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text()).get("quantization_config")
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() in ("awq", "gptq")



def checkpoint_name(module_path: str, moe_prefix: str) -> str:
    """A transformers 5 module path as transformers 4 checkpoints name it (Mixtral: mlp -> block_sparse_moe)."""
    return module_path.replace(".mlp.", f".{moe_prefix}.") if moe_prefix != "mlp" else module_path


def v5_name(key: str, moe_prefix: str) -> str:
    return key.replace(f".{moe_prefix}.", ".mlp.") if moe_prefix != "mlp" else key


def expect(shards, key: str, shape: tuple, what: str, dtype=None) -> torch.Tensor:
    tensor = shards.get(key)
    if tensor is None:
        raise MoekernError(f"{str(shards.path)!r} has no tensor {key!r} ({what})")
    if tuple(tensor.shape) != tuple(shape):
        raise MoekernError(f"{key} has shape {tuple(tensor.shape)}; {what} needs {tuple(shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise MoekernError(f"{key} has dtype {tensor.dtype}; {what} needs {dtype}")
    return tensor


def read_linear(shards, key: str, k: int, n: int, hq: HubQuant, dtype, groups: set) -> dict:
    """One 4-bit linear (in k, out n) of the checkpoint, checked against the format and converted to moekern's layout
    {"qweight", "scales" (in dtype), "zeros"}; its group size is added to `groups`."""
    group = k if hq.group_size == -1 else hq.group_size
    what = f"a {hq.method.upper()} linear with in={k}, out={n}, group_size={hq.group_size}"
    if k % group or n % layout.PACK or k % layout.PACK:
        raise MoekernError(f"{key}: {what} cannot be stored (the widths must be multiples of 8 and of the group)")
    if hq.method == "awq":
        shapes = {"qweight": (k, n // 8), "qzeros": (k // group, n // 8), "scales": (k // group, n)}
    else:
        shapes = {"qweight": (k // 8, n), "qzeros": (k // group, n // 8), "scales": (k // group, n)}
    t = {part: expect(shards, f"{key}.{part}", shape, what, torch.int32 if part != "scales" else None)
         for part, shape in shapes.items()}
    if not t["scales"].is_floating_point():
        raise MoekernError(f"{key}.scales has dtype {t['scales'].dtype}; {what} needs floating point scales")
    groups.add(group)
    if hq.method == "awq":
        return published.from_awq(t["qweight"], t["qzeros"], t["scales"], dtype)
    g_idx = shards.get(f"{key}.g_idx")
    if g_idx is None and hq.desc_act:
        raise MoekernError(f"{key}.g_idx is missing in an act-order (desc_act) checkpoint")
    if g_idx is not None:
        if tuple(g_idx.shape) != (k,):
            raise MoekernError(f"{key}.g_idx has shape {tuple(g_idx.shape)}; {what} needs ({k},)")
        if not bool((g_idx.long() == torch.arange(k) // group).all()):
            raise MoekernError(
                f"{key}.g_idx permutes the groups (act-order without static groups: g_idx is not k // {group}); "
                f"moekern's layout needs contiguous groups. Requantize with static_groups, or without desc_act"
            )
    return published.from_gptq(t["qweight"], t["qzeros"], t["scales"], None, hq.version, dtype)
