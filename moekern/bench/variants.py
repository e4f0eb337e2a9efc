"""The two models a bench run compares, made from one set of weights: the baseline is transformers' model as it
loads (no moekern patch); the variant is the same model patched by moekern, then compressed by a recipe if one is
given. The baseline is measured first and then turned into the variant in place, so only one copy is in memory."""

from moekern.errors import MoekernError

BASELINE = "transformers"
UNCOMPRESSED = "none"  # the recipe of a model that was not compressed


def variant_name(recipe: str | None) -> str:
    return f"moekern+{recipe}" if recipe else "moekern"


def make_variant(model, tokenizer, recipe: str | None, calib_samples: int = 32, calib_seq_len: int = 256):
    """moekern.patch(model), then moekern.compress(model, recipe, ...) in place (calibration on the shipped corpus,
    tokenized by `tokenizer`). Returns the model to measure."""
    import moekern

    moekern.patch(model)
    if not recipe:
        return model
    from moekern.compression.recipe import compress

    check_calibration(recipe, tokenizer)
    model = compress(model, recipe, None, tokenizer=tokenizer, samples=calib_samples, seq_len=calib_seq_len,
                     inplace=True)
    moekern.patch(model)  # blocks swapped in by the compression run moekern's experts too
    return model


def recipe_of(model) -> str:
    """The recipe recorded in a model's moekern decisions, or 'none'."""
    d = getattr(model.config, "moekern", None) or {}
    return d.get("recipe") or UNCOMPRESSED


def check_calibration(recipe: str | None, tokenizer) -> None:
    """A recipe that calibrates needs a tokenizer for the shipped corpus; a preset has none."""
    from moekern.compression.recipe import as_recipe

    if recipe and tokenizer is None and as_recipe(recipe).needs_calibration():
        raise MoekernError(f"--recipe {recipe}: calibration needs a tokenizer and a preset has none; compress a model "
                           f"folder that has its tokenizer, or use a recipe without calibration (e.g. rtn4)")


def parse_recipe(recipe: str | None) -> None:
    """Fail on a recipe typo before any model is built or measured."""
    if recipe:
        from moekern.compression.recipe import as_recipe

        as_recipe(recipe)
