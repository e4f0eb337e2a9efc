"""Whole checkpoint folders of 4-bit MoE models as the hub publishes them: AutoAWQ ("awq", version "gemm") and GPTQ
("gptq", checkpoint_format "gptq" or "gptq_v2"), loaded into moekern's 4-bit modules, and written back.

    from moekern.quantized_folders import load_quantized_folder, save_quantized_folder
    model, tokenizer = load_quantized_folder("/models/Mixtral-8x7B-v0.1-AWQ", dtype=torch.float16, device="cuda")
    save_quantized_folder(model, "out-awq", fmt="awq")            # a moekern 4-bit model as an AutoAWQ folder

A folder is config.json with a `quantization_config` ({"quant_method": "awq", "bits": 4, "group_size": 128,
"zero_point": true, "version": "gemm"} or {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": ...,
"sym": ..., "checkpoint_format": "gptq"}), safetensors weights (one file, or shards listed by
model.safetensors.index.json) in transformers 4 naming, one linear per expert:

    Mixtral                       model.layers.N.block_sparse_moe.experts.E.w1 / w3 / w2   (gate / up / down)
                                  model.layers.N.block_sparse_moe.gate.weight               (router, 16-bit)
    Qwen2-MoE, Qwen3-MoE, OLMoE,  model.layers.N.mlp.experts.E.gate_proj / up_proj / down_proj
    DeepSeek-V2/V3                model.layers.N.mlp.gate.weight (router), shared experts and dense MLPs by name

each 4-bit linear as .qweight / .qzeros / .scales (GPTQ also .g_idx, either maybe .bias), anything else (norms,
routers, embeddings, lm_head, linears left 16-bit) as plain tensors. The format, tensor
by tensor: moekern.formats (hub_config.py, published.py).

Loading builds the model from config.json on the meta device (nothing downloaded, no remote code), puts a
QuantizedExperts in every MoE layer whose experts are 4-bit and a QuantizedLinear wherever a linear is, then
converts and assigns the tensors. What is 4-bit is read from the tensors themselves (".qweight"), not from
modules_to_not_convert. It refuses, naming the tensor or the field: a missing shard, a missing tensor or one of the
wrong shape or dtype, a tensor the model has no place for, bits other than 4, another quant_method or AWQ version,
zero_point false, GPTQ act-order checkpoints whose groups are permuted (g_idx not k // group_size), and families
whose experts are not stored one linear per expert (GPT-OSS). The loaded model records {"method": "awq" | "gptq",
"bits": 4, "group_size": G, "format": ...} under decisions(model)["quant"], so moekern.save / moekern.load round-trip it.
"""

import json
from pathlib import Path

import torch
from torch import nn

from moekern import folders, targets
from moekern.errors import MoekernError
from moekern.formats import hub_config, published
from moekern.formats.hub_config import is_quantized_folder  # noqa: F401 (what moekern.load dispatches on)
from moekern.model_files import (Shards, fill_tied_weights, load_tokenizer, materialise_buffers, resolve_model_dir,
                                 write_weights)
from moekern.models.base import expert_activation, expert_weights
from moekern.modules.quant import QuantizedExperts, QuantizedLinear

# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
def load_quantized_folder(path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu"):
    """Load an AutoAWQ (GEMM) or GPTQ checkpoint folder of an MoE model into moekern's 4-bit modules:
    (model, tokenizer or None), in eval mode. dtype: the activation dtype (scales, 16-bit tensors); default the
    config's dtype, else float16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moekern.models import family_of
    from moekern.surgery import decisions

    path = resolve_model_dir(path)
    hq = hub_config.read_quantization_config(json.loads((path / "config.json").read_text()))
    if hq is None:
        raise MoekernError(f"{str(path / 'config.json')!r} has no quantization_config: not an AWQ / GPTQ folder")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = family_of(config)
    if family.name not in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"):
        raise MoekernError(
            f"{family.name} checkpoints do not store their experts one linear per expert, the layout of published "
            f"AWQ / GPTQ MoE checkpoints; moekern cannot import a 4-bit {family.name} folder"
        )
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # moekern's modules replace transformers' quantizer
    dtype = _dtype(dtype, config)
    shards = Shards(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    state, groups, quantized_paths = {}, set(), []
    moe_prefix = hub_config.MOE_PREFIX.get(family.name, "mlp")
    names = hub_config.EXPERT_NAMES.get(family.name, hub_config.DEFAULT_NAMES)
    layers_path = _path_of(model, _decoder_layers(model))
    for index, layer in enumerate(_decoder_layers(model)):
        experts = targets.routed_experts(layer)
        if experts is None:
            continue
        prefix = f"{layers_path}.{index}.{moe_prefix}.experts"
        module_path = f"{layers_path}.{index}.mlp.experts"
        w_gu, w_d, _, _ = expert_weights(experts)
        num, inter2, hidden = w_gu.shape
        inter = inter2 // 2
        if f"{prefix}.0.{names[0]}.qweight" in shards:
            tensors = {}
            for part, parts, (k, n) in (("gate_up_proj", names[:2], (hidden, inter)),
                                        ("down_proj", names[2:], (inter, hidden))):
                per_expert = [[hub_config.read_linear(shards, f"{prefix}.{e}.{name}", k, n, hq, dtype, groups)
                               for name in parts] for e in range(num)]
                for key in ("qweight", "scales", "zeros"):  # gate and up side by side along N: gate_up = [gate; up]
                    tensors[f"{part}_{key}"] = torch.stack([torch.cat([p[key] for p in ps], dim=-1)
                                                            for ps in per_expert])
            targets.set_module(model, module_path, QuantizedExperts(tensors, expert_activation(experts)))
            quantized_paths.append(module_path)
        elif f"{prefix}.0.{names[0]}.weight" in shards:  # experts left 16-bit: stacked as transformers stores them
            def fp(e, name, shape):
                key = f"{prefix}.{e}.{name}.weight"
                return hub_config.expect(shards, key, shape, "a 16-bit expert linear").to(dtype)

            state[f"{module_path}.gate_up_proj"] = torch.stack(
                [torch.cat([fp(e, names[0], (inter, hidden)), fp(e, names[1], (inter, hidden))]) for e in range(num)])
            state[f"{module_path}.down_proj"] = torch.stack([fp(e, names[2], (hidden, inter)) for e in range(num)])
        else:
            raise MoekernError(
                f"{str(path)!r} has no tensor {prefix}.0.{names[0]}.qweight (nor .weight): the experts of layer "
                f"{index} are missing, or the checkpoint is not {family.name} in transformers 4 naming"
            )
    for module_path, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        key = hub_config.checkpoint_name(module_path, moe_prefix)
        if f"{key}.qweight" not in shards:
            continue
        tensors = hub_config.read_linear(shards, key, module.in_features, module.out_features, hq, dtype, groups)
        bias = shards.get(f"{key}.bias")
        if module.bias is not None:
            bias = hub_config.expect(shards, f"{key}.bias", (module.out_features,), "the bias of a 4-bit linear")
            tensors["bias"] = bias.to(dtype)
        elif bias is not None and bool(bias.any()):
            raise MoekernError(f"{key}.bias is not zero, but {module_path} has no bias in this architecture")
        targets.set_module(model, module_path, QuantizedLinear(tensors))
        quantized_paths.append(module_path)
    if not groups:
        raise MoekernError(f"{str(path)!r} says it is {hq.method.upper()} but holds no .qweight tensor")
    # everything else: plain tensors, under their transformers 5 names
    expected = model.state_dict()
    renamed = {}
    for key in shards.keys():
        if key in shards.taken:
            continue
        target = key if key in expected else hub_config.v5_name(key, moe_prefix)
        if target not in expected:
            continue
        renamed[target] = key
    for target, key in renamed.items():
        tensor = shards.get(key)
        want = expected[target]
        if tuple(tensor.shape) != tuple(want.shape):
            raise MoekernError(
                f"{key} has shape {tuple(tensor.shape)}, the model built from config.json needs {tuple(want.shape)}"
            )
        state[target] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    unexpected = sorted(k for k in shards.keys() if k not in shards.taken)
    if unexpected:
        raise MoekernError(
            f"{str(path)!r} holds {len(unexpected)} tensor(s) this {family.name} model has no place for, e.g. "
            f"{unexpected[:5]}; the checkpoint is from another architecture or layout"
        )
    fill_tied_weights(model, state)
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not any(k.startswith(f"{p}.") for p in quantized_paths)]  # filled already
    if missing:
        raise MoekernError(
            f"{str(path)!r} lacks {len(missing)} tensor(s) the model needs, e.g. {sorted(missing)[:5]} "
            f"(as transformers 5 names); a shard or tensor is missing"
        )
    model.tie_weights()
    if len(groups) > 1:
        raise MoekernError(f"{str(path)!r} mixes group sizes {sorted(groups)}")
    group = groups.pop()
    decisions(model)["quant"] = {"method": hq.method, "bits": 4, "group_size": group, "format": hq.format}
    model = model.to(dtype=dtype)
    materialise_buffers(model, config)  # after the cast: the rotary inv_freq stays fp32, as transformers keeps it
    model = model.to(device=device).eval()
    return model, load_tokenizer(path)


def _dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MoekernError(f"dtype must be a floating point torch dtype (float16, bfloat16, float32), got {dtype!r}")
    return dtype


def _is_router(module_path: str, family) -> bool:
    """Whether a module is the router of an MoE block (`...mlp.gate`, GPT-OSS `...mlp.router`)."""
    parent, _, name = module_path.rpartition(".")
    return name == family.router_attr and parent.rsplit(".", 1)[-1] == "mlp"


def _decoder_layers(model):
    from moekern.surgery import decoder_layers

    return decoder_layers(model)


def _path_of(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------
def save_quantized_folder(model, path: str | Path, fmt: str = "awq", tokenizer=None, checkpoint_format: str = "gptq",
                          round_scales: bool = False, allow_zero_v1: bool = False,
                          max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write a moekern 4-bit model as a hub-format folder: fmt "awq" (AutoAWQ GEMM) or "gptq" (checkpoint_format
    "gptq" = v1 or "gptq_v2"), in transformers 4 per-expert naming, with the matching quantization_config, that
    load_quantized_folder reads back exactly.

    The model must be a standard architecture (no masked experts, skip thresholds or removed MoE layers; Block Drop
    and a uniform stored Expert Drop are fine), quantized without AWQ input scales (the formats have no place for a
    per-expert scale: RTN and GPTQ models, or AWQ models whose scales were all folded). Scales are stored as float16
    (the formats' type): a model quantized in float32 has scales float16 cannot hold exactly, refused unless
    round_scales. GPTQ v1 cannot store a zero point of 0 (refused unless allow_zero_v1; use "gptq_v2").
    max_shard_bytes: split the weights into shards with a model.safetensors.index.json. The folder is written as
    moekern.save writes (moekern.folders: an existing moekern model is replaced only with overwrite=True)."""
    from moekern.config_on_disk import config_for_disk
    from moekern.models import family_of
    from moekern.surgery import KEY, decisions

    if fmt not in ("awq", "gptq"):
        raise MoekernError(f"unknown checkpoint format {fmt!r}; choose 'awq' or 'gptq'")
    if fmt == "gptq" and checkpoint_format not in hub_config.GPTQ_FORMATS:
        raise MoekernError(f"GPTQ checkpoint_format must be one of {sorted(hub_config.GPTQ_FORMATS)}, got "
                           f"{checkpoint_format!r}")
    version = hub_config.GPTQ_FORMATS.get(checkpoint_format, 1)
    d = decisions(model)
    if not d.get("quant"):
        raise MoekernError("the model is not quantized; quantize it first (moekern.quantize_ or moekern.compress)")
    family = family_of(model)
    if family.name not in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"):
        raise MoekernError(f"{family.name} has no per-expert layout in the published formats; cannot export it")
    if d["dropped_moe_layers"] or any(b is not None for b in d["skip_beta"]):
        raise MoekernError("removed MoE layers and per-token skip are not a standard architecture; the published "
                           "formats cannot describe them (moekern.save keeps them)")
    config = config_for_disk(model)
    count = getattr(config, family.expert_count_field)
    layers = _decoder_layers(model)
    for index, layer in enumerate(layers):
        mlp = layer.mlp
        if hasattr(mlp, "alive") and (not bool(mlp.alive.all()) and not mlp.compact()):
            raise MoekernError(f"decoder layer {index} masks experts; not a standard architecture")
        experts = getattr(mlp, "experts", None)
        if experts is not None and experts.num_experts != count:
            raise MoekernError(
                f"decoder layer {index} stores {experts.num_experts} experts but the config says {count}: Expert "
                f"Drop with different counts per layer (or a grouped router) is not a standard architecture"
            )
    moe_prefix = hub_config.MOE_PREFIX.get(family.name, "mlp")
    names = hub_config.EXPERT_NAMES.get(family.name, hub_config.DEFAULT_NAMES)
    layers_path = _path_of(model, layers)
    out, consumed, quantized, not_converted = {}, set(), [], []
    group_sizes = set()

    def scales_ok(name, scales):
        if not round_scales and not torch.equal(scales.to(torch.float16).to(scales.dtype), scales):
            raise MoekernError(
                f"{name}: the scales ({scales.dtype}) are not exactly representable in float16, the formats' type; "
                f"quantize the model in float16 or bfloat16, or pass round_scales=True to round them"
            )

    for module_path, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            if hasattr(module, "gate_up_proj_bias") or hasattr(module, "down_proj_bias"):
                raise MoekernError(f"{module_path}: expert biases have no place in the published formats")
            for part in ("gate_up_proj", "down_proj"):
                scales_ok(f"{module_path}.{part}_scales", getattr(module, f"{part}_scales"))
            group_sizes.add(module.group_size)
            prefix = hub_config.checkpoint_name(module_path, moe_prefix)
            tensors = published.export_experts(module, prefix, names, fmt, version, allow_zero_v1)
            out.update(tensors)
            quantized += sorted({k.rsplit(".", 1)[0] for k in tensors})
            consumed.update(f"{module_path}.{b}" for b, _ in module.named_buffers())
        elif isinstance(module, QuantizedLinear):
            if hasattr(module, "input_scale"):
                raise MoekernError(f"{module_path} carries an AWQ input scale, which the published formats cannot "
                                   f"hold (only scales folded into the op before are)")
            scales_ok(f"{module_path}.scales", module.scales)
            group_sizes.add(module.group_size)
            key = hub_config.checkpoint_name(module_path, moe_prefix)
            if fmt == "awq":
                tensors = published.to_awq(module.qweight, module.scales, module.zeros)
            else:
                tensors = published.to_gptq(module.qweight, module.scales, module.zeros, version, allow_zero_v1)
            if getattr(module, "bias", None) is not None:
                tensors["bias"] = module.bias
            out.update({f"{key}.{k}": v.contiguous() for k, v in tensors.items()})
            quantized.append(key)
            consumed.update(f"{module_path}.{b}" for b, _ in module.named_buffers())
        elif type(module) is nn.Linear or _is_router(module_path, family):
            # the routers too (transformers 5 gives them classes of their own, e.g. MixtralTopKRouter): AutoAWQ's
            # loader would otherwise make every module it is not told about a 4-bit layer
            not_converted.append(hub_config.checkpoint_name(module_path, moe_prefix))
        elif targets.ROUTED == module_path.rsplit(".", 1)[-1] and isinstance(getattr(module, "gate_up_proj", None),
                                                                              nn.Parameter):
            w_gu, w_d, b_gu, _ = expert_weights(module)  # 16-bit experts: one linear per expert
            if b_gu is not None:
                raise MoekernError(f"{module_path}: expert biases have no place in the published formats")
            inter = w_gu.shape[1] // 2
            prefix = hub_config.checkpoint_name(module_path, moe_prefix)
            for e in range(w_gu.shape[0]):
                out[f"{prefix}.{e}.{names[0]}.weight"] = w_gu[e, :inter].contiguous()
                out[f"{prefix}.{e}.{names[1]}.weight"] = w_gu[e, inter:].contiguous()
                out[f"{prefix}.{e}.{names[2]}.weight"] = w_d[e].contiguous()
                not_converted += [f"{prefix}.{e}.{n}" for n in names]
            consumed.update(f"{module_path}.{p}" for p, _ in module.named_parameters())
    if len(group_sizes) != 1:
        raise MoekernError(f"the published formats have one group size per checkpoint; this model has {group_sizes}")
    group = group_sizes.pop()
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    tied_keys = set((getattr(model, "_tied_weights_keys", None) or {}).keys()) if tied else set()
    for key, tensor in model.state_dict().items():
        if key in consumed or key in tied_keys:
            continue
        out[hub_config.checkpoint_name(key, moe_prefix)] = tensor.detach().contiguous()
    seen = set()
    for k, v in out.items():  # no two names on one storage: safetensors refuses shared tensors
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    config_dict = config.to_dict()
    config_dict.pop(KEY, None)
    if fmt == "awq":
        config_dict["quantization_config"] = {
            "quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": sorted(not_converted),
        }
    else:
        block_prefix = f"{layers_path}."
        in_block = sorted({".".join(k[len(block_prefix):].split(".")[1:]) for k in quantized
                           if k.startswith(block_prefix)})
        config_dict["quantization_config"] = {
            "quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": False,
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
            "checkpoint_format": checkpoint_format, "modules_in_block_to_quantize": [in_block],
        }
    source = getattr(model.config, "_name_or_path", None)
    with folders.replaced_folder(path, folders.MODEL, overwrite=overwrite, sources=[source]) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        write_weights(out, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path).expanduser()
