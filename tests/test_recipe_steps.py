"""Recipe steps as registered classes: every registered step reads and writes its own example, the grammar's help
and errors list every step from the registry, a step written in one new class joins parsing, checking, compressing
and the paper's labels without touching anything else, and run_recipe is a deprecated name of compress."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

import moekern
from moekern import surgery
from moekern.compression import steps
from moekern.compression.recipe import Recipe, check_recipe, compress, paper_label, run_recipe
from moekern.compression.steps import STEPS, TrimmingStep, parse_step, register
from moekern.errors import MoekernError


@pytest.mark.parametrize("cls", STEPS, ids=lambda c: c.__name__)
def test_every_registered_step_reads_and_writes_its_example(cls):
    step = parse_step(cls.example)
    assert type(step) is cls
    assert str(step) == cls.example and parse_step(str(step)) == step
    assert cls.syntax and cls.help.strip()
    assert dataclasses.is_dataclass(step) and step.slimming == cls.slimming


def test_the_steps_in_every_message_and_help_come_from_the_registry():
    from moekern.cli import build_parser

    with pytest.raises(MoekernError) as error:
        Recipe.parse("prune-everything")
    compress_help = next(a for a in build_parser()._actions if a.dest == "command").choices["compress"].format_help()
    squeezed = re.sub(r"\s+", "", compress_help)
    for cls in STEPS:
        assert cls.syntax in str(error.value)
        assert re.sub(r"\s+", "", cls.syntax) in squeezed
        assert cls.help.strip().splitlines()[0].strip() in steps.help_text()


@dataclasses.dataclass(frozen=True)
class Halve(TrimmingStep):
    """A kind of step the package does not have: drop the first half of every MoE layer's surviving experts."""

    strict: bool = False

    names = ("halve",)
    syntax = "halve[:strict]"
    example = "halve:strict"
    help = "    halve                    drop half the experts of each MoE layer"
    rank = 65

    @classmethod
    def parse(cls, name, value, options, raw):
        if value is not None or set(options) - {"strict"}:
            raise MoekernError(f"recipe step {raw!r}: write halve or halve:strict")
        return cls("strict" in options)

    def __str__(self):
        return "halve" + (":strict" if self.strict else "")

    def check(self, model, worst, where):
        super().check(model, worst, where)
        if self.strict and min(e - e // 2 for e in worst.experts) < 2 * worst.top_k:
            raise MoekernError(f"{where}: halving would leave fewer than 2 x top_k experts")
        worst.experts = [e - e // 2 for e in worst.experts]

    def apply(self, model, stats, *, allow_fewer):
        kept = {}
        for layer in surgery.moe_layer_ids(model):
            experts = list(range(surgery.decisions(model)["original_num_experts"]))
            kept[layer] = experts[len(experts) // 2:]
            surgery.drop_experts(model, {layer: experts[: len(experts) // 2]})
        return {"kept_experts": kept}

    def label(self, shape):
        return f"E{shape.experts // 2}/{shape.experts} (halved)"


@pytest.fixture
def halve():
    register(Halve)
    yield Halve
    STEPS.remove(Halve)


def test_a_new_kind_of_step_is_one_registered_class(halve):
    model = tiny_model("mixtral")  # 3 layers, 6 experts, top-2
    recipe = Recipe.parse("rtn4+HALVE")
    assert recipe.steps[1] == Halve() and str(recipe) == "rtn4+halve"
    assert "halve[:strict]" in steps.syntax()
    with pytest.raises(MoekernError, match="fewer than 2 x top_k"):
        check_recipe(Recipe.parse("halve:strict"), model)  # the class's own check, before any work
    with pytest.raises(MoekernError, match="write halve or halve:strict"):
        Recipe.parse("halve=2")
    result = compress(model, "halve", torch.randint(3, 97, (2, 8)), return_result=True)
    assert result.steps[0]["kept_experts"] == {i: [3, 4, 5] for i in range(3)}
    assert [len(k) for k in surgery.decisions(result.model)["kept_experts"]] == [3, 3, 3]
    assert paper_label(Recipe.parse("awq4+halve+layer-drop=1"), model) == "+ E3/6 (halved) + L1/3 w/ AWQ"


def test_paper_labels_come_from_the_steps():
    model = tiny_model("mixtral")
    labels = {"awq4+layer-drop=2": "+ L2/3 w/ AWQ", "expert-drop=2:layerwise+rtn4:g64": "+ E2/6 layer-wise w/ RTN g64",
              "block-drop=1:iterative+skip=q0.3": "+ B1/3 iterative + skip (beta q0.3)", "rtn4:attn": "w/ RTN + attention",
              "wanda=2:4": "w/ Wanda 2:4", "sparsegpt=0.5": "w/ SparseGPT 50%", "enum-prune=4": "+ keep 4/6 (enumeration)"}
    for text, label in labels.items():
        assert paper_label(Recipe.parse(text), model) == label


def test_run_recipe_is_a_deprecated_name_of_compress():
    model, ids = tiny_model("mixtral"), torch.randint(3, 97, (2, 8))
    with pytest.warns(DeprecationWarning, match="return_result=True"):
        old = run_recipe(model, "layer-drop=1", ids)
    new = moekern.compress(model, "layer-drop=1", ids, return_result=True)
    assert old.steps[0]["dropped_moe_layers"] == new.steps[0]["dropped_moe_layers"]
    assert moekern.compress is compress  # the function itself, not a callable package


def test_runners_import_no_command():
    """Commands (moekern/cli/, and each package's own cli.py) import runners; runners import only the commands'
    common leaf."""
    root = Path(moekern.__file__).parent
    for path in root.rglob("*.py"):
        if path.parts[len(root.parts)] == "cli" or path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" if node.module == "moekern" else node.module or ""
                         for a in node.names]
            for name in names:
                if name.startswith("moekern.cli"):
                    assert name == "moekern.cli.common", f"{path.relative_to(root)} imports {name}"
