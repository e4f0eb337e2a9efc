"""Recipes: the compression steps of a model as one string (or the equivalent dataclass), and `compress`, which
checks a recipe against the model and then applies it.

    compress(model, "awq4+layer-drop=4", tokenizer=tokenizer)      # -> a new, compressed model
    Recipe.parse("rtn4:g64+expert-drop=2:layerwise+skip=q0.3")    # str(recipe) gives the canonical string back

Steps are joined by "+"; a step's options follow it after ":" in any order (e.g. gptq4:g64:act:sym):
  Expert Slimming (at most one step; needs moekern.quant)
    rtn4, awq4, gptq4        4-bit quantization, group size 128; ":g64" or ":g32" for smaller groups
      awq4:autoawq           AutoAWQ's MoE scheme (one scale for every expert's gate/up, folded into the
                             post-attention norm, judged on the whole MoE output; moekern.quant.autoawq) instead of
                             moekern's per-expert, routing-weighted AWQ
      gptq4:act, gptq4:sym   act-order (columns by decreasing Hessian diagonal) and AutoGPTQ's symmetric grid
      gptq4:autogptq         AutoGPTQ's defaults as He et al. ran them: act-order, symmetric, and each expert's
                             Hessian without moekern's routing weights
      ...:attn               quantize the attention projections too (as llama.cpp's Q4_0 does): a decode step then
                             reads 4-bit attention as well; the paper, and the default, quantize the experts only
    wanda=0.5, sparsegpt=0.5 unstructured pruning to that sparsity;  wanda=2:4, sparsegpt=4:8 for N:M sparsity
      ...:shared             prune the shared experts too (the paper's Table 5 and "w/" rows of Table 8)
  Expert Trimming (in the order written)
    expert-drop=N            Expert Drop of N experts per MoE layer on average, ":global" (default) or ":layerwise";
                             ":nofloor" lets a layer keep fewer than top_k experts, or none (Eq. 11 exactly: a layer
                             left without experts loses its MoE, as Layer Drop); ":topk" scores an expert by the mean
                             of its top-k routing weights (the authors' DeepSeek score) instead of its mean softmax
    layer-drop=N             Layer Drop of N MoE layers, ":oneshot" (default) or ":iterative"
    block-drop=N             Block Drop of N decoder layers, ":oneshot" (default) or ":iterative"
    enum-prune=R             keep R experts per MoE layer by enumeration pruning (Lu et al.); ":all" enumerates every
                             subset on every calibration token with Lu et al.'s loss instead of a token sample
    skip, skip=q0.3          dynamic skipping with beta the median (or the 0.3 quantile) weight ratio per layer

Order: "ST" (default) applies the slimming step first, then the trimming steps, as the paper found slightly better
(App. D); "TS" trims first. Each trimming step measures the model as it is at that point (one calibration pass).
"""

import copy
import math
import re
import time
from dataclasses import dataclass, field

import torch

from moekern.errors import MoekernError

ORDERS = ("ST", "TS")
QUANT_METHODS = ("rtn", "awq", "gptq")
PRUNE_METHODS = ("wanda", "sparsegpt")
GROUP_SIZES = (128, 64, 32)
DEFAULT_GROUP = 128


# ----------------------------------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quantize:
    method: str  # rtn | awq | gptq
    bits: int = 4
    group_size: int = DEFAULT_GROUP
    act_order: bool = False  # gptq ":act"
    sym: bool = False  # gptq ":sym"
    scheme: str = "moekern"  # awq: "moekern" | "autoawq"
    attention: bool = False  # ":attn": the attention projections are quantized too
    slimming = True

    def __str__(self):
        return (f"{self.method}{self.bits}" + ("" if self.group_size == DEFAULT_GROUP else f":g{self.group_size}")
                + (":act" if self.act_order else "") + (":sym" if self.sym else "")
                + ("" if self.scheme == "moekern" else f":{self.scheme}") + (":attn" if self.attention else ""))


@dataclass(frozen=True)
class Prune:
    method: str  # wanda | sparsegpt
    sparsity: float | None = 0.5  # unstructured; None for N:M
    n: int | None = None
    m: int | None = None
    shared: bool = False  # ":shared": the shared experts are pruned too
    slimming = True

    def __str__(self):
        pattern = f"{self.n}:{self.m}" if self.n is not None else repr(self.sparsity)
        return f"{self.method}={pattern}" + (":shared" if self.shared else "")


@dataclass(frozen=True)
class ExpertDrop:
    n: int
    mode: str = "global"  # global | layerwise
    floor: bool = True  # False (":nofloor"): a layer may keep fewer than top_k experts, or none
    score: str = "softmax"  # softmax | topk (":topk")
    slimming = False

    def __str__(self):
        return (f"expert-drop={self.n}" + ("" if self.mode == "global" else f":{self.mode}")
                + ("" if self.floor else ":nofloor") + ("" if self.score == "softmax" else f":{self.score}"))


@dataclass(frozen=True)
class LayerDrop:
    n: int
    iterative: bool = False
    slimming = False

    def __str__(self):
        return f"layer-drop={self.n}" + (":iterative" if self.iterative else "")


@dataclass(frozen=True)
class BlockDrop:
    n: int
    iterative: bool = False
    slimming = False

    def __str__(self):
        return f"block-drop={self.n}" + (":iterative" if self.iterative else "")


@dataclass(frozen=True)
class EnumPrune:
    keep: int
    all_tokens: bool = False  # ":all": every subset on every calibration token, Lu et al.'s loss
    slimming = False

    def __str__(self):
        return f"enum-prune={self.keep}" + (":all" if self.all_tokens else "")


@dataclass(frozen=True)
class Skip:
    quantile: float = 0.5
    slimming = False

    def __str__(self):
        return "skip" if self.quantile == 0.5 else f"skip=q{self.quantile!r}"


Step = Quantize | Prune | ExpertDrop | LayerDrop | BlockDrop | EnumPrune | Skip
SYNTAX = ("rtn4, awq4[:autoawq], gptq4[:act][:sym] or gptq4:autogptq (each optionally :g128/:g64/:g32 and :attn), "
          "wanda=0.5[:shared], "
          "sparsegpt=2:4[:shared], expert-drop=N[:global|:layerwise][:nofloor][:topk], "
          "layer-drop=N[:iterative], block-drop=N[:iterative], enum-prune=R[:all], skip or skip=q0.3")
# The options each step takes after its name or value (":option"); the first of a group is the default.
QUANT_OPTIONS = {"rtn": ("attn",), "awq": ("autoawq", "attn"), "gptq": ("act", "sym", "autogptq", "attn")}
COUNTED_OPTIONS = {"expert-drop": ("global", "layerwise", "nofloor", "topk"), "layer-drop": ("oneshot", "iterative"),
                   "block-drop": ("oneshot", "iterative"), "enum-prune": ("all",)}
EXCLUSIVE = ({"global", "layerwise"}, {"oneshot", "iterative"})


@dataclass(frozen=True)
class Recipe:
    """A sequence of steps; `Recipe.parse(text)` and `str(recipe)` convert to and from the string form."""

    steps: tuple[Step, ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        if not isinstance(text, str) or not text.strip():
            raise MoekernError(f"empty recipe; give steps joined by '+': {SYNTAX}")
        recipe = cls(tuple(parse_step(part) for part in text.split("+")))
        recipe.check_syntax()
        return recipe

    def __str__(self):
        return "+".join(str(step) for step in self.steps)

    @property
    def slimming(self) -> list[Step]:
        return [s for s in self.steps if s.slimming]

    @property
    def trimming(self) -> list[Step]:
        return [s for s in self.steps if not s.slimming]

    def ordered(self, order: str = "ST") -> list[Step]:
        order = order.upper() if isinstance(order, str) else order  # like the steps, the order ignores case
        if order not in ORDERS:
            raise MoekernError(f"order must be 'ST' (slimming then trimming) or 'TS', got {order!r}")
        return self.slimming + self.trimming if order == "ST" else self.trimming + self.slimming

    def check_syntax(self) -> None:
        """What is wrong with the recipe whatever the model."""
        if not self.steps:
            raise MoekernError(f"empty recipe; give steps joined by '+': {SYNTAX}")
        if len(self.slimming) > 1:
            raise MoekernError(f"recipe {self}: at most one Expert Slimming step (quantization or pruning), got "
                               f"{', '.join(map(str, self.slimming))}")
        if sum(isinstance(s, Skip) for s in self.steps) > 1:
            raise MoekernError(f"recipe {self}: 'skip' may appear once")

    def needs_calibration(self) -> bool:
        return any(not (isinstance(s, Quantize) and s.method == "rtn") for s in self.steps)


def parse_step(text: str) -> Step:
    """One step of the string form (see the module doc)."""
    raw = text
    text = text.strip().lower()
    if not text:
        raise MoekernError("empty step in the recipe (two '+' in a row, or a '+' at an end?)")
    quant = re.fullmatch(r"(rtn|awq|gptq)(\d*)(?::(.*))?", text)
    if quant:
        method, bits, options = quant.groups()
        if bits != "4":
            raise MoekernError(f"recipe step {raw!r}: moekern quantizes to 4 bits; write {method}4")
        group, flags = DEFAULT_GROUP, []
        for option in _options(options, raw):
            found = re.fullmatch(r"g(\d+)", option)
            if found:
                if int(found.group(1)) not in GROUP_SIZES:
                    raise MoekernError(f"recipe step {raw!r}: the group option is :g128, :g64 or :g32")
                group = int(found.group(1))
            elif option in QUANT_OPTIONS[method]:
                flags.append(option)
            else:
                allowed = ", ".join(f":{o}" for o in ("g128", "g64", "g32", *QUANT_OPTIONS[method]))
                raise MoekernError(f"recipe step {raw!r}: {method}4 takes {allowed}, not :{option}")
        if "autogptq" in flags and len(set(flags) - {"attn"}) > 1:
            raise MoekernError(f"recipe step {raw!r}: :autogptq already means act-order and the symmetric grid; "
                               f"write gptq4:autogptq")
        scheme = next((f for f in flags if f in ("autoawq", "autogptq")), "moekern")
        return Quantize(method, 4, group, act_order="act" in flags, sym="sym" in flags, scheme=scheme,
                        attention="attn" in flags)
    name, equals, value = text.partition("=")
    if not equals:
        name, _, rest = name.partition(":")
        options = _options(rest or None, raw)
    elif name in PRUNE_METHODS:  # the value holds N:M, so ":shared" is only ever its last part
        shared = value.endswith(":shared")
        value, options = value.removesuffix(":shared"), ["shared"] if shared else []
    else:
        value, _, rest = value.partition(":")
        options = _options(rest or None, raw)
    if name in PRUNE_METHODS:
        if not equals:
            raise MoekernError(f"recipe step {raw!r}: give a sparsity, e.g. {name}=0.5 or {name}=2:4")
        shared = options == ["shared"]
        nm = re.fullmatch(r"(\d+):(\d+)", value)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if not 0 < n < m:
                raise MoekernError(f"recipe step {raw!r}: N:M sparsity needs 0 < N < M, e.g. 2:4")
            return Prune(name, None, n, m, shared)
        if ":" in value:
            raise MoekernError(f"recipe step {raw!r}: {name} takes a sparsity (0.5) or N:M (2:4), then optionally "
                               f":shared")
        sparsity = _number(value, raw, "a sparsity such as 0.5, or N:M such as 2:4")
        if not 0.0 < sparsity < 1.0:
            raise MoekernError(f"recipe step {raw!r}: sparsity must be between 0 and 1 (exclusive)")
        return Prune(name, sparsity, shared=shared)
    if name == "skip":
        if options:
            raise MoekernError(f"recipe step {raw!r}: skip takes no option; write skip or skip=q0.3")
        if not equals:
            return Skip()
        if not value.startswith("q"):
            raise MoekernError(f"recipe step {raw!r}: write skip=q<quantile>, e.g. skip=q0.3 (skip alone: median)")
        q = _number(value[1:], raw, "a quantile between 0 and 1, e.g. skip=q0.3")
        if not 0.0 <= q <= 1.0:
            raise MoekernError(f"recipe step {raw!r}: the quantile must be between 0 and 1")
        return Skip(q)
    if name not in COUNTED_OPTIONS:
        raise MoekernError(f"unknown recipe step {raw.strip()!r}; the steps are: {SYNTAX}")
    if not equals:
        raise MoekernError(f"recipe step {raw!r}: give a count, e.g. {name}=2")
    if not re.fullmatch(r"\d+", value) or int(value) < 1:
        raise MoekernError(f"recipe step {raw!r}: {name} needs a whole number >= 1, got {value!r}")
    count = int(value)
    for option in options:
        if option not in COUNTED_OPTIONS[name]:
            allowed = COUNTED_OPTIONS[name]
            what = (f"no option other than :{allowed[0]}" if len(allowed) == 1
                    else " or ".join(f":{o}" for o in allowed))
            raise MoekernError(f"recipe step {raw!r}: {name} takes {what}, not :{option}")
    for group in EXCLUSIVE:
        if len(group & set(options)) > 1:
            raise MoekernError(f"recipe step {raw!r}: choose one of {' or '.join(sorted(':' + o for o in group))}")
    if name == "expert-drop":
        return ExpertDrop(count, "layerwise" if "layerwise" in options else "global", floor="nofloor" not in options,
                          score="topk" if "topk" in options else "softmax")
    if name == "layer-drop":
        return LayerDrop(count, "iterative" in options)
    if name == "block-drop":
        return BlockDrop(count, "iterative" in options)
    return EnumPrune(count, all_tokens="all" in options)


def _options(text: str | None, raw: str) -> list[str]:
    """The ":"-separated options after a step's name or value; an empty or repeated one is an error."""
    if text is None:
        return []
    options = text.split(":")
    if "" in options:
        raise MoekernError(f"recipe step {raw!r}: an empty option (two ':' in a row, or a ':' at the end?)")
    if len(set(options)) != len(options):
        raise MoekernError(f"recipe step {raw!r}: an option is repeated")
    return options


def _number(text: str, raw: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MoekernError(f"recipe step {raw!r}: {text!r} is not a number; expected {expected}") from None
    if not math.isfinite(value):
        raise MoekernError(f"recipe step {raw!r}: expected {expected}")
    return value


def as_recipe(recipe: "Recipe | str") -> Recipe:
    if isinstance(recipe, Recipe):
        recipe.check_syntax()
        return recipe
    return Recipe.parse(recipe)


# ----------------------------------------------------------------------------------------------------------------------
# Checking a recipe against a model, before any work
# ----------------------------------------------------------------------------------------------------------------------
def check_recipe(recipe: Recipe, model, allow_fewer: bool = False) -> None:
    """Raise MoekernError if the recipe cannot run to the end on this model.

    Which layers a data-driven step removes is not known in advance, so the counts are followed in the worst case:
    a Block Drop is assumed to remove MoE layers, a Layer or Block Drop the layers with the most experts, and after a
    global Expert Drop every layer is assumed to be at its minimum. A recipe that passes never fails midway on a
    count; one that is rejected says which step could fail."""
    from moekern import surgery

    recipe.check_syntax()
    had_decisions = bool(getattr(model.config, surgery.KEY, None))
    try:
        _check_counts(recipe, model, allow_fewer)
    finally:
        # reading the counts creates empty decisions: checking must not change the caller's model
        if not had_decisions and hasattr(model.config, surgery.KEY):
            delattr(model.config, surgery.KEY)


def _check_counts(recipe: Recipe, model, allow_fewer: bool) -> None:
    from moekern import surgery
    from moekern.compress.expert_drop import min_experts
    from moekern.models import family_of

    top_k = family_of(model).router_spec(model.config).top_k
    original_experts = surgery.decisions(model)["original_num_experts"]
    blocks = len(surgery.decoder_layers(model))
    experts = sorted(_alive_count(model, i) for i in surgery.moe_layer_ids(model))  # worst-case counts per MoE layer

    for step in recipe.steps:
        where = f"recipe {recipe}: step {step}"
        if isinstance(step, (Quantize, Prune)):
            config = _slimming_config(step)
            config.validate()
            if isinstance(step, Quantize):
                if surgery.decisions(model).get("quant"):
                    raise MoekernError(f"{where}: the model is already quantized; start from the 16-bit model")
                # moekern.quant's own width check (group size vs. the quantized widths), before any work
                from moekern.quant.apply import check_widths

                check_widths(model, config)
        elif isinstance(step, BlockDrop):
            if step.n >= blocks:
                raise MoekernError(f"{where} would leave no decoder layer (the model has {blocks}); drop fewer")
            blocks -= step.n
            experts = experts[: max(0, len(experts) - step.n)]
        elif isinstance(step, LayerDrop):
            if step.n > len(experts):
                raise MoekernError(f"{where}: only {len(experts)} MoE layers (at worst) are left to drop; drop fewer")
            experts = experts[: len(experts) - step.n]
        else:
            if not experts:
                raise MoekernError(f"{where}: no MoE layer is left for it")
            floors = [min_experts(top_k, e, allow_fewer) for e in experts]
            if isinstance(step, ExpertDrop) and not step.floor:
                # Eq. 11 without a floor: a layer may lose all its experts (and then its MoE), but not every layer
                total, drop = sum(experts), step.n * len(experts)
                if (min(experts) <= step.n) if step.mode == "layerwise" else drop >= total:
                    raise MoekernError(f"{where} would drop every expert of {'a' if step.mode == 'layerwise' else 'every'} "
                                       f"MoE layer (they have {experts} at worst); drop fewer, or use layer-drop")
                if step.mode == "layerwise":
                    experts = [e - step.n for e in experts]
                else:  # at worst the survivors sit in the fewest layers, one expert each: the strictest later checks
                    experts = [1] * -(-(total - drop) // max(experts))
            elif isinstance(step, ExpertDrop):
                room = [e - f for e, f in zip(experts, floors)]
                fits = (min(room) >= step.n) if step.mode == "layerwise" else sum(room) >= step.n * len(experts)
                if not fits:
                    raise MoekernError(
                        f"{where}: the MoE layers have {experts} experts (at worst) and keep at least "
                        f"{'top_k=' + str(top_k) if not allow_fewer else 1} each; drop fewer"
                        + ("" if allow_fewer else " or allow fewer experts than top_k (--allow-fewer-experts, or "
                           ":nofloor)"))
                experts = ([e - step.n for e in experts] if step.mode == "layerwise" else floors)
            elif isinstance(step, EnumPrune):
                if step.keep >= original_experts:
                    raise MoekernError(f"{where}: keep fewer than the {original_experts} experts a layer has")
                if step.keep < top_k and not allow_fewer:
                    raise MoekernError(f"{where}: keeping {step.keep} experts is fewer than top_k={top_k}; keep more "
                                       f"or allow it (--allow-fewer-experts)")
                if step.all_tokens:
                    from moekern.compress.enum_prune import check_enumeration

                    check_enumeration(experts, step.keep, where)
                experts = [min(e, step.keep) for e in experts]
            elif isinstance(step, Skip) and top_k < 2:
                raise MoekernError(f"{where}: skipping needs top_k >= 2 (this model routes to {top_k} expert)")


def _alive_count(model, original: int) -> int:
    from moekern import surgery
    from moekern.modules.moe import MoEBlock

    mlp = surgery.decoder_layers(model)[surgery.original_layer_ids(model).index(original)].mlp
    return int(mlp.alive.sum()) if isinstance(mlp, MoEBlock) else surgery.decisions(model)["original_num_experts"]


def _slimming_config(step):
    try:
        from moekern.quant import PruneConfig, QuantConfig
    except ImportError as exc:
        raise MoekernError(
            f"step {step}: Expert Slimming (moekern.quant) is not available in this build ({exc})") from exc
    if isinstance(step, Quantize):
        return QuantConfig(method=step.method, bits=step.bits, group_size=step.group_size, act_order=step.act_order,
                           sym=step.sym, scheme=step.scheme, quantize_attention=step.attention)
    if step.n is not None:
        return PruneConfig(method=step.method, sparsity=None, n=step.n, m=step.m, prune_shared_experts=step.shared)
    return PruneConfig(method=step.method, sparsity=step.sparsity, prune_shared_experts=step.shared)


# ----------------------------------------------------------------------------------------------------------------------
# Running a recipe
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class CompressionResult:
    model: object
    recipe: Recipe
    order: str
    steps: list[dict]  # per step: {"step", "kind", "seconds", and what it decided}
    stats: object | None  # the TrimStats of the first trimming step (the model before trimming), for the report
    before: dict  # sizes (moekern.compress.report.model_size)
    after: dict
    calibration_shape: tuple | None


def compress(model, recipe: "Recipe | str", calibration=None, order: str = "ST", **options):
    """Compress `model` by `recipe` (a string or a Recipe) and return the compressed model.

    The caller's model is not modified: it is deep-copied first (which needs memory for a second copy), unless
    inplace=True. calibration: token ids LongTensor [n, L]; or a path to a local corpus, or None for the shipped
    corpus, both cut into blocks with the `tokenizer` option (samples, seq_len, seed: see
    moekern.compress.calibration). RTN alone needs no calibration. Other options: allow_fewer (experts below top_k
    per layer), batch_size, device (where each layer is calibrated). The recipe is checked against the model
    before any work (check_recipe) and recorded in decisions(model)["recipe"]. See run_recipe for the details of
    each step."""
    return run_recipe(model, recipe, calibration, order, **options).model


def run_recipe(model, recipe: "Recipe | str", calibration=None, order: str = "ST", *, tokenizer=None,
               allow_fewer: bool = False, inplace: bool = False, samples: int | None = None,
               seq_len: int | None = None, seed: int = 0, batch_size: int = 8, device=None,
               base_stats=None, quant_calibration=None) -> CompressionResult:
    """compress(), returning the CompressionResult: what each step decided, the statistics measured before
    trimming, and the sizes before and after (what moekern.compress.report writes).

    base_stats: TrimStats the caller measured (moekern.compress.stats.measure) on this very model, unchanged, and
    on the same calibration tensor; a trimming step that comes first uses them instead of measuring again if they
    were measured as it would measure them (record_tokens, batch_size, device, seed). Exact: it saves one pass per
    recipe when many recipes compress copies of one model (moekern paper).

    quant_calibration: the calibration of a quantization step (AWQ, GPTQ) where it differs from the others' (the
    paper: Pile for AWQ, Alpaca for GPTQ, C4 for the rest): token ids or a source, as `calibration`."""
    from moekern import arguments, folders, surgery
    from moekern.compress.report import model_size

    recipe = as_recipe(recipe)
    steps = recipe.ordered(order)
    order = order.upper()
    samples = None if samples is None else arguments.positive_int(samples, "samples")
    seq_len = None if seq_len is None else arguments.positive_int(seq_len, "seq_len", minimum=2)
    batch_size = arguments.positive_int(batch_size, "batch_size")
    seed = arguments.index(seed, "seed", "an integer")
    device = arguments.device(device)
    check_recipe(recipe, model, allow_fewer)
    ids = _calibration(recipe, calibration, tokenizer, samples, seq_len, seed)
    quant_ids = ids
    if quant_calibration is not None and any(isinstance(s, Quantize) and s.method != "rtn" for s in steps):
        quant_ids = _calibration(recipe, quant_calibration, tokenizer, samples, seq_len, seed)
    for blocks in {id(t): t for t in (ids, quant_ids) if t is not None}.values():  # each tensor once
        arguments.check_positions(model.config, blocks.shape[1], "the calibration blocks' length (seq_len)")
        vocab = getattr(model.config.get_text_config(), "vocab_size", None)
        if vocab and (int(blocks.min()) < 0 or int(blocks.max()) >= vocab):
            raise MoekernError(f"calibration token ids must be in 0..{vocab - 1} (the vocabulary), got "
                               f"{int(blocks.min())}..{int(blocks.max())}: were they made by another tokenizer?")
    if not inplace:
        model = copy.deepcopy(model)
    from moekern.models import adopt

    adopt(model)
    before = model_size(model)
    log, first_stats = [], None
    for step in steps:
        started = time.perf_counter()
        if step.slimming:
            entry = _slim(model, step, quant_ids if isinstance(step, Quantize) else ids, batch_size, device)
        else:
            from moekern.compress.stats import measure

            enum_all = isinstance(step, EnumPrune) and step.all_tokens
            options = dict(batch_size=batch_size, device=device, seed=seed,
                           record_tokens=isinstance(step, EnumPrune) and not enum_all,
                           enumerate_keep=step.keep if enum_all else 0)
            if not log and _measured_as(base_stats, ids, options):
                stats = base_stats
            else:
                stats = measure(model, ids, **options)
            first_stats = first_stats or stats
            entry = _trim(model, step, stats, allow_fewer)
        log.append({"step": str(step), "kind": "slimming" if step.slimming else "trimming", **entry,
                    "seconds": round(time.perf_counter() - started, 2)})
    # one min/max per tensor: a NaN or inf weight (from the input, or made by a step) is refused, never saved
    folders.check_finite(model.state_dict().items(), f"the model compressed by {recipe}",
                         hint="were the input weights or the calibration data already broken?")
    d = surgery.decisions(model)
    d["recipe"] = str(recipe)
    d["recipe_order"] = order
    shape = None if ids is None else tuple(ids.shape)
    return CompressionResult(model, recipe, order, log, first_stats, before, model_size(model), shape)


def _measured_as(stats, ids, options: dict) -> bool:
    """Whether `stats` were measured on the tensor `ids` with these options of measure (and its defaults)."""
    from moekern.compress.stats import MAX_RATIOS, MAX_TOKENS

    wanted = {**options, "max_tokens": MAX_TOKENS, "max_ratios": MAX_RATIOS}
    return stats is not None and stats.calibration is ids and all(stats.options.get(k) == v for k, v in wanted.items())


def _calibration(recipe, calibration, tokenizer, samples, seq_len, seed):
    if not recipe.needs_calibration():
        return None
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype != torch.long or calibration.numel() == 0:
            raise MoekernError(f"calibration must be token ids, a LongTensor [n, L]; got {tuple(calibration.shape)} "
                               f"{calibration.dtype}")
        return calibration
    if tokenizer is None:
        raise MoekernError(f"recipe {recipe} needs calibration data: pass calibration=LongTensor [n, L], or a "
                           f"tokenizer (tokenizer=...) to cut a corpus into blocks")
    from moekern.compress.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, calibration_blocks

    return calibration_blocks(tokenizer, calibration, samples or DEFAULT_SAMPLES, seq_len or DEFAULT_SEQ_LEN, seed)


def _slim(model, step, ids, batch_size, device) -> dict:
    config = _slimming_config(step)
    from moekern.quant import prune_, quantize_

    if isinstance(step, Quantize):
        report = quantize_(model, config, calibration=ids if config.needs_calibration else None, device=device,
                           batch_size=batch_size)
    else:
        report = prune_(model, config, calibration=ids, device=device, batch_size=batch_size)
    return {"report": _jsonable(report)}


def _trim(model, step, stats, allow_fewer) -> dict:
    from moekern.compress.depth_drop import block_drop, layer_drop
    from moekern.compress.enum_prune import enum_prune
    from moekern.compress.expert_drop import expert_drop
    from moekern.compress.skip import dynamic_skip

    if isinstance(step, ExpertDrop):
        return {"kept_experts": expert_drop(model, stats, step.n, step.mode, allow_fewer, step.floor, step.score)}
    if isinstance(step, LayerDrop):
        return {"dropped_moe_layers": layer_drop(model, stats, step.n, step.iterative)}
    if isinstance(step, BlockDrop):
        return {"dropped_blocks": block_drop(model, stats, step.n, step.iterative)}
    if isinstance(step, EnumPrune):
        return {"enum_prune": enum_prune(model, stats, step.keep, allow_fewer)}
    return {"skip_beta": dynamic_skip(model, stats, step.quantile)}


def _jsonable(value):
    """A report from another module, made safe for json.dumps (tensors become lists, unknown objects strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
