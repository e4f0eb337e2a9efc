"""Recipes: the compression steps of a model as one string (or the equivalent dataclass), and `compress`, which
checks a recipe against the model and then applies it.

    compress(model, "awq4+layer-drop=4", tokenizer=tokenizer)      # -> a new, compressed model
    Recipe.parse("rtn4:g64+expert-drop=2:layerwise+skip=q0.3")    # str(recipe) gives the canonical string back

Steps are joined by "+"; a step's options follow it after ":" in any order (e.g. gptq4:g64:act:sym). The kinds of
step, and what each means, are the classes of moekern.compression.steps (one module each; `help_text()` lists them,
as `moekern compress --help` does).

Order: "ST" (default) applies the slimming step first, then the trimming steps, as the paper found slightly better
(App. D); "TS" trims first. Each trimming step measures the model as it is at that point (one calibration pass).
"""

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch

from moekern.compression.steps import (BlockDrop, EnumPrune, ExpertDrop, LayerDrop, Prune, Quantize, Shape, Skip,
                                    SlimmingStep, Step, TrimmingStep, WorstCase, help_text, parse_step, syntax)
from moekern.compression.steps.quantize import DEFAULT_GROUP, GROUP_SIZES
from moekern.errors import MoekernError

ORDERS = ("ST", "TS")
SYNTAX = syntax()
HELP = help_text()

__all__ = ["Recipe", "compress", "run_recipe", "check_recipe", "as_recipe", "parse_step", "paper_label",
           "CompressionResult", "Step", "Quantize", "Prune", "ExpertDrop", "LayerDrop", "BlockDrop", "EnumPrune", "Skip",
           "SYNTAX", "HELP", "ORDERS", "GROUP_SIZES", "DEFAULT_GROUP"]


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
        for kind in {type(s) for s in self.steps if s.once}:
            if sum(type(s) is kind for s in self.steps) > 1:
                raise MoekernError(f"recipe {self}: '{kind.names[0]}' may appear once")

    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.steps)


def as_recipe(recipe: "Recipe | str") -> Recipe:
    if isinstance(recipe, Recipe):
        recipe.check_syntax()
        return recipe
    return Recipe.parse(recipe)


def paper_label(recipe: Recipe, model) -> str:
    """The paper's way of naming a row: '+ E2/8', '+ L2/8 w/ AWQ', 'w/ RTN', ... (trimming first, as in its tables);
    `model` is the uncompressed model, whose sizes the labels count against."""
    from moekern import surgery

    d = surgery.decisions(model)
    shape = Shape(d["original_num_hidden_layers"], d["original_num_experts"], len(surgery.moe_layer_ids(model)))
    trims = [f"+ {s.label(shape)}" for s in recipe.steps if not s.slimming]
    return " ".join([*trims, *(s.label(shape) for s in recipe.steps if s.slimming)])


# ----------------------------------------------------------------------------------------------------------------------
# Checking a recipe against a model, before any work
# ----------------------------------------------------------------------------------------------------------------------
def check_recipe(recipe: Recipe, model, allow_fewer: bool = False) -> None:
    """Raise MoekernError if the recipe cannot run to the end on this model.

    Which layers a data-driven step removes is not known in advance, so the counts are followed in the worst case
    (moekern.compression.steps.WorstCase), each step checking itself. A recipe that passes never fails midway on a
    count; one that is rejected says which step could fail."""
    from moekern import surgery

    recipe.check_syntax()
    had_decisions = bool(getattr(model.config, surgery.KEY, None))
    try:
        worst = _worst_case(model, allow_fewer)
        for step in recipe.steps:
            step.check(model, worst, f"recipe {recipe}: step {step}")
    finally:
        # reading the counts creates empty decisions: checking must not change the caller's model
        if not had_decisions and hasattr(model.config, surgery.KEY):
            delattr(model.config, surgery.KEY)


def _worst_case(model, allow_fewer: bool) -> WorstCase:
    from moekern import surgery
    from moekern.models import family_of

    return WorstCase(top_k=family_of(model).router_spec(model.config).top_k,
                     original_experts=surgery.decisions(model)["original_num_experts"],
                     blocks=len(surgery.decoder_layers(model)),
                     experts=sorted(_alive_count(model, i) for i in surgery.moe_layer_ids(model)),
                     allow_fewer=allow_fewer)


def _alive_count(model, original: int) -> int:
    from moekern import surgery
    from moekern.modules.moe import MoEBlock

    mlp = surgery.decoder_layers(model)[surgery.original_layer_ids(model).index(original)].mlp
    return int(mlp.alive.sum()) if isinstance(mlp, MoEBlock) else surgery.decisions(model)["original_num_experts"]


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
    before: dict  # sizes (moekern.compression.report.model_size)
    after: dict
    calibration_shape: tuple | None


def compress(model, recipe: "Recipe | str", calibration=None, order: str = "ST", *, tokenizer=None,
             allow_fewer: bool = False, inplace: bool = False, samples: int | None = None,
             seq_len: int | None = None, seed: int = 0, batch_size: int = 8, device=None,
             base_stats=None, quant_calibration=None, return_result: bool = False):
    """Compress `model` by `recipe` (a string or a Recipe) and return the compressed model (with
    return_result=True, the CompressionResult: what each step decided, the statistics measured before trimming, and
    the sizes before and after, which moekern.compression.report writes).

    The caller's model is not modified: it is deep-copied first (which needs memory for a second copy), unless
    inplace=True. calibration: token ids LongTensor [n, L]; or a path to a local corpus, or None for the shipped
    corpus, both cut into blocks with the `tokenizer` option (samples, seq_len, seed: see
    moekern.compression.calibration). RTN alone needs no calibration. Other options: allow_fewer (experts below top_k
    per layer), batch_size, device (where each layer is calibrated). The recipe is checked against the model
    before any work (check_recipe) and recorded in decisions(model)["recipe"].

    base_stats: TrimStats the caller measured (trimming.stats.measure) on this very model, unchanged, and
    on the same calibration tensor; a trimming step that comes first uses them instead of measuring again if they
    were measured as it would measure them (record_tokens, batch_size, device, seed). Exact: it saves one pass per
    recipe when many recipes compress copies of one model (moekern.compression.shared).

    quant_calibration: the calibration of a quantization step (AWQ, GPTQ) where it differs from the others' (the
    paper: Pile for AWQ, Alpaca for GPTQ, C4 for the rest): token ids or a source, as `calibration`."""
    from moekern import arguments, folders, surgery
    from moekern.compression.report import model_size

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
    if quant_calibration is not None and any(s.slimming and s.quantizes and s.needs_calibration for s in steps):
        quant_ids = _calibration(recipe, quant_calibration, tokenizer, samples, seq_len, seed)
    for blocks in {id(t): t for t in (ids, quant_ids) if t is not None}.values():  # each tensor once
        arguments.check_positions(model.config, blocks.shape[1], "the calibration blocks' length (seq_len)")
        vocab = getattr(model.config.get_text_config(), "vocab_size", None)
        if vocab and (int(blocks.min()) < 0 or int(blocks.max()) >= vocab):
            raise MoekernError(f"calibration token ids must be in 0..{vocab - 1} (the vocabulary), got "
                               f"{int(blocks.min())}..{int(blocks.max())}: were they made by another tokenizer?")
    if not inplace:
        model = copy.deepcopy(model)
    from moekern.surgery import adopt

    adopt(model)
    before = model_size(model)
    log, first_stats = [], None
    for step in steps:
        started = time.perf_counter()
        if step.slimming:
            entry = _slim(model, step, quant_ids if step.quantizes else ids, batch_size, device)
        else:
            from moekern.compression.trimming.stats import measure

            options = dict(batch_size=batch_size, device=device, seed=seed, **step.measure_options())
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
    result = CompressionResult(model, recipe, order, log, first_stats, before, model_size(model), shape)
    return result if return_result else model


def run_recipe(model, recipe: "Recipe | str", calibration=None, order: str = "ST", **options) -> CompressionResult:
    """Deprecated: compress(..., return_result=True), which it calls."""
    warnings.warn("moekern.compression.recipe.run_recipe is deprecated; call moekern.compress(..., return_result=True)",
                  DeprecationWarning, stacklevel=2)
    return compress(model, recipe, calibration, order, **options, return_result=True)


def _measured_as(stats, ids, options: dict) -> bool:
    """Whether `stats` were measured on the tensor `ids` with these options of measure (and its defaults)."""
    from moekern.compression.trimming.stats import MAX_RATIOS, MAX_TOKENS

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
    from moekern.compression.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, calibration_blocks

    return calibration_blocks(tokenizer, calibration, samples or DEFAULT_SAMPLES, seq_len or DEFAULT_SEQ_LEN, seed)


def _slim(model, step: SlimmingStep, ids, batch_size, device) -> dict:
    return {"report": _jsonable(step.apply(model, ids, batch_size=batch_size, device=device))}


def _trim(model, step: TrimmingStep, stats, allow_fewer) -> dict:
    return step.apply(model, stats, allow_fewer=allow_fewer)


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
