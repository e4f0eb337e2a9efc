"""Many recipes compressed from one model on one calibration tensor, sharing the work that is exact to share:

  - statistics: a trimming step that comes first measures the model as it is. A model's statistics are measured
    once per kind of measurement (TrimmingStep.measure_options) and handed to every recipe that starts with such a
    step (compress(base_stats=...), which uses them only where they were measured as it would measure them);
  - slimming: a slimming step that comes first (order ST: awq4 in awq4+block-drop=2) depends on the step and the
    model only, so it runs once per step, and each recipe that starts with it continues from a copy of its model.

`moekern compress` (one recipe, whose first calibration pass also records the block-wise similarity matrix of its
report: first_step_stats), `moekern paper` (its rows) and the paper's extra tables compress through here.
"""

import copy
import time
from dataclasses import dataclass, field

BLOCK_MATRIX_TOKENS = 8192  # calibration tokens behind the block-wise similarity matrix (Fig. 7) of a report


@dataclass
class Root:
    """A model recipes start from (copied, never changed): the uncompressed model, or it after a slimming step; with
    its calibration statistics, measured once per kind when first needed."""

    model: object
    name: str
    steps: list = field(default_factory=list)  # the log of the step that made it
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)  # (record_tokens, enumerate_keep) -> TrimStats


@dataclass
class Shared:
    """What a recipe took from work done once: a slimmed model (`of` its step, made in `seconds`) or the
    calibration statistics `of` a model."""

    what: str  # "model" | "statistics"
    of: str  # a slimming step's text, or "uncompressed"
    seconds: float | None = None

    def __str__(self):
        if self.what == "model":
            return f"the {self.of} model (made once, {self.seconds:.1f} s)"
        return f"the calibration statistics of the {self.of} model"


@dataclass
class Compressed:
    model: object
    recipe: object  # the Recipe
    steps: list[dict]  # each step's log entry (CompressionResult.steps), the shared slimming step's included
    shared: list[Shared]
    seconds: float  # the work of this recipe alone (copy and the steps not shared)


def stats_key(options: dict) -> tuple:
    return options["record_tokens"], options["enumerate_keep"]


def measure_root(root: Root, calibration, options: dict, *, seed: int, batch_size: int = 8, device=None,
                 block_tokens: int = 0):
    """The statistics of `root.model` measured with `options` (TrimmingStep.measure_options), once."""
    from moekern.compression.trimming.stats import measure

    key = stats_key(options)
    if key not in root.stats:
        root.stats[key] = measure(root.model, calibration, batch_size=batch_size, device=device, seed=seed,
                                  block_tokens=block_tokens, **options)
    return root.stats[key]


def first_step_stats(model, recipe, calibration, order: str = "ST", *, seed: int = 0, batch_size: int = 8,
                     device=None, block_tokens: int = 0):
    """The statistics the recipe's first step measures when it is a trimming step (None otherwise), measured now
    with the block-wise similarity matrix of `block_tokens` tokens too: pass them to compress(base_stats=...)."""
    first = recipe.ordered(order)[0]
    if first.slimming:
        return None
    return measure_root(Root(model, "uncompressed"), calibration, first.measure_options(), seed=seed,
                        batch_size=batch_size, device=device, block_tokens=block_tokens)


class SharedCompression:
    """Recipes compressed from copies of `model` (never changed) on `calibration` (token ids [n, L])."""

    def __init__(self, model, calibration, *, order: str = "ST", allow_fewer: bool = False, seed: int = 0,
                 share_stats: bool = True):
        self.base = Root(model, "uncompressed")
        self.calibration, self.order, self.allow_fewer, self.seed = calibration, order, allow_fewer, seed
        self.share_stats = share_stats
        self.slimmed: dict[str, Root] = {}
        self.on_slimmed = None  # called with each slimmed Root when it is made

    def stats(self, root: Root, options: dict | None = None, block_tokens: int = 0):
        """The statistics of a root (default options: those of Layer and Block Drop), measured once."""
        options = options or {"record_tokens": False, "enumerate_keep": 0}
        return measure_root(root, self.calibration, options, seed=self.seed, block_tokens=block_tokens)

    def keep_slimmed(self, names) -> None:
        """Free the slimmed models no recipe to come starts with."""
        for name in [n for n in self.slimmed if n not in names]:
            del self.slimmed[name]

    def slimmed_root(self, step) -> Root:
        from moekern.compression.recipe import Recipe, compress

        name = str(step)
        if name not in self.slimmed:
            started = time.perf_counter()
            result = compress(copy.deepcopy(self.base.model), Recipe((step,)), self.calibration, inplace=True,
                              seed=self.seed, return_result=True)
            self.slimmed[name] = Root(result.model, name, result.steps, time.perf_counter() - started)
            if self.on_slimmed:
                self.on_slimmed(self.slimmed[name])
        return self.slimmed[name]

    def compress(self, recipe, order: str | None = None) -> Compressed:
        """A copy of the right root, compressed by the rest of the recipe (a Recipe or its text), with the recipe and
        the order recorded in its decisions as a run from the uncompressed model would record them."""
        from moekern import surgery
        from moekern.compression.recipe import Recipe, as_recipe, check_recipe, compress

        recipe, order = as_recipe(recipe), (order or self.order).upper()
        check_recipe(recipe, self.base.model, self.allow_fewer)
        ordered = recipe.ordered(order)
        root, rest, shared = self.base, ordered, []
        if ordered[0].slimming:
            root = self.slimmed_root(ordered[0])
            rest = ordered[1:]
            shared.append(Shared("model", root.name, root.seconds))
        started = time.perf_counter()
        model, steps = copy.deepcopy(root.model), list(root.steps)
        if rest:
            base_stats = None
            if self.share_stats and not rest[0].slimming:
                base_stats = self.stats(root, rest[0].measure_options())
                shared.append(Shared("statistics", root.name))
            result = compress(model, Recipe(tuple(rest)), self.calibration, order, inplace=True,
                                                 allow_fewer=self.allow_fewer, seed=self.seed,
                                                 base_stats=base_stats, return_result=True)
            model, steps = result.model, steps + result.steps
        d = surgery.decisions(model)
        d["recipe"], d["recipe_order"] = str(recipe), order
        return Compressed(model, recipe, steps, shared, time.perf_counter() - started)
