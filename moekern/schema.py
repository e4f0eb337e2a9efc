"""The schema of `config.json["moekern"]`, the compression decisions moekern.save records (moekern.surgery), checked
by moekern.load before any weight is read. Every field's type, range and length is checked against the rest of
config.json; an error names the field and the value.

    original_num_hidden_layers  int >= 1: L, the decoder layers before Block Drop
    original_num_experts        int >= 1: E, the routed experts per layer before Expert Drop
    dropped_blocks              distinct layer ids in [0, L), fewer than L; num_hidden_layers = L - len(dropped_blocks)
    dropped_moe_layers          distinct layer ids in [0, L), none of them a dropped block
    kept_experts                L entries: null, or the distinct expert ids in [0, E) a layer kept (at least one);
                                null for dropped blocks and dropped MoE layers
    skip_beta                   L entries: null or a number in [0, 1]; null for dropped blocks and MoE layers
    quant                       null or {"method": rtn|awq|gptq, "bits": 4, "group_size": int >= 1, ...}
    prune                       null or an object
    recipe, recipe_order        null or a string (recipe_order: "ST" or "TS")
The family's expert count in config.json (num_local_experts, num_experts, n_routed_experts) is E, or, where every
MoE layer stored the same smaller number of experts, that number: then every kept_experts entry has that length.
"""

import math

from moekern.errors import MoekernError

REQUIRED = ("original_num_hidden_layers", "original_num_experts", "dropped_blocks", "dropped_moe_layers",
            "kept_experts", "skip_beta")
QUANT_METHODS = ("rtn", "awq", "gptq")


def validate_decisions(d, config: dict, where: str = "config.json") -> None:
    """Raise MoekernError if `d` (config.json["moekern"]) is not valid for `config` (the rest of config.json)."""

    def bad(field: str, value, why: str) -> MoekernError:
        return MoekernError(f"{where}: moekern.{field} = {_short(value)} {why}. The file was edited or damaged; "
                            f"save the model again with moekern.save")

    if not isinstance(d, dict):
        raise MoekernError(f"{where}: \"moekern\" must be an object with moekern's decisions, got {_short(d)}. The "
                           f"file was edited or damaged; save the model again with moekern.save")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise MoekernError(f"{where}: \"moekern\" lacks the field{'s' * (len(missing) > 1)} {', '.join(missing)}. "
                           f"The file was edited or damaged; save the model again with moekern.save")

    layers, experts = d["original_num_hidden_layers"], d["original_num_experts"]
    for field, value in (("original_num_hidden_layers", layers), ("original_num_experts", experts)):
        if not _is_int(value) or value < 1:
            raise bad(field, value, "must be a whole number >= 1")

    def ids(field: str, value, what: str, count: int, count_field: str) -> list[int]:
        """Distinct integer ids in 0..count-1."""
        if not isinstance(value, list) or not all(_is_int(i) for i in value):
            raise bad(field, value, f"must be a list of {what} ids")
        if len(set(value)) != len(value):
            raise bad(field, value, f"names {'an' if what[0] in 'aeiou' else 'a'} {what} twice")
        outside = [i for i in value if not 0 <= i < count]
        if outside:
            raise bad(field, value, f"names {what} {outside[0]}, outside 0..{count - 1} ({count_field} = {count})")
        return value

    def layer_ids(field: str) -> list[int]:
        return ids(field, d[field], "layer", layers, "original_num_hidden_layers")

    blocks = layer_ids("dropped_blocks")
    if len(blocks) >= layers:
        raise bad("dropped_blocks", blocks, f"removes all {layers} layers")
    stored_layers = config.get("num_hidden_layers")
    if stored_layers != layers - len(blocks):
        raise bad("dropped_blocks", blocks, f"with original_num_hidden_layers = {layers} leaves "
                                            f"{layers - len(blocks)} layers, but num_hidden_layers is "
                                            f"{_short(stored_layers)}")
    moe_dropped = layer_ids("dropped_moe_layers")
    both = sorted(set(blocks) & set(moe_dropped))
    if both:
        raise bad("dropped_moe_layers", moe_dropped, f"names layer {both[0]}, which dropped_blocks removed entirely")
    gone = set(blocks) | set(moe_dropped)

    def per_layer(field: str) -> list:
        """The field's entries of the layers that still have their MoE (the others must be null)."""
        values = d[field]
        if not isinstance(values, list) or len(values) != layers:
            raise bad(field, values, f"must be a list of {layers} entries (one per original layer)")
        for i, value in enumerate(values):
            if value is not None and i in gone:
                raise bad(f"{field}[{i}]", value, "must be null: that layer's MoE was removed")
        return [(f"{field}[{i}]", value) for i, value in enumerate(values) if value is not None]

    for field, kept in per_layer("kept_experts"):
        if kept == []:
            raise bad(field, kept, "must be null or a non-empty list of expert ids")
        ids(field, kept, "expert", experts, "original_num_experts")
    for field, beta in per_layer("skip_beta"):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
                or not 0 <= beta <= 1:
            raise bad(field, beta, "must be null or a number in [0, 1]")

    _check_expert_count(config, d["kept_experts"], experts, bad)

    quant = d.get("quant")
    if quant is not None:
        if not isinstance(quant, dict):
            raise bad("quant", quant, "must be null or an object")
        if quant.get("method") not in QUANT_METHODS:
            raise bad("quant.method", quant.get("method"), f"must be one of {', '.join(QUANT_METHODS)}")
        if quant.get("bits") != 4:
            raise bad("quant.bits", quant.get("bits"), "must be 4")
        if not _is_int(quant.get("group_size")) or quant["group_size"] < 1:
            raise bad("quant.group_size", quant.get("group_size"), "must be a whole number >= 1")
    if d.get("prune") is not None and not isinstance(d["prune"], dict):
        raise bad("prune", d["prune"], "must be null or an object")
    if d.get("recipe") is not None and not isinstance(d["recipe"], str):
        raise bad("recipe", d["recipe"], "must be null or a string")
    if d.get("recipe_order") not in (None, "ST", "TS"):
        raise bad("recipe_order", d["recipe_order"], "must be null, \"ST\" or \"TS\"")


def _check_expert_count(config: dict, kept: list, experts: int, bad) -> None:
    from moekern.model_types import base_model_type
    from moekern.models import FAMILIES

    config = {**config, "model_type": base_model_type(config.get("model_type")) or config.get("model_type")}
    family = FAMILIES.get(config.get("model_type"))
    if family is None:
        raise MoekernError(f"moekern does not know the model type {config.get('model_type')!r}. Known MoE "
                           f"families: {', '.join(sorted(FAMILIES))}.")
    field = family.expert_count_field
    try:  # the config class may store the field under another name (Qwen3-MoE: num_experts -> num_local_experts)
        from transformers import CONFIG_MAPPING

        stored = getattr(CONFIG_MAPPING[config["model_type"]], "attribute_map", {}).get(field, field)
    except KeyError:
        stored = field
    count = config.get(stored, config.get(field))
    if count == experts:
        return
    lengths = {len(ids) for ids in kept if ids is not None}
    if not _is_int(count) or count > experts or lengths != {count}:
        raise bad("original_num_experts", experts,
                  f"does not fit {field} = {_short(count)}: the experts on disk are either all "
                  f"{experts} or, after the same Expert Drop in every MoE layer, the number each kept_experts "
                  f"entry lists (here {sorted(lengths) or 'none'})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
