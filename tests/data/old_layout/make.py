"""How the folders beside this script were made: by moekern before checkpoints used the hub layout (commit 9c808d2,
which saved the in-memory transformers 5 names), so that tests/test_hub_layout.py checks that such folders still load
and generate the same tokens. Rerunning it with today's moekern would write the hub layout instead.

    PYTHONPATH=<a checkout of 9c808d2> python tests/data/old_layout/make.py
"""

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for tiny_models

import moekern  # noqa: E402
from moekern import surgery  # noqa: E402
from moekern.compression.slimming import QuantConfig, quantize_  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

PROMPT = [[5, 17, 33, 2, 61, 40], [8, 9, 10, 11, 12, 13]]


def trimmed():
    model = tiny_model("mixtral", num_hidden_layers=5)
    surgery.drop_experts(model, {0: [0, 2, 3, 5], 2: [1, 2]})
    surgery.drop_experts(model, {3: [0, 1, 4]}, mask_only=True)
    surgery.set_skip_beta(model, {0: 0.3, 3: 0.6})
    surgery.remove_moe_layers(model, [4])
    surgery.remove_blocks(model, [1])
    return model


def quantized():
    model = tiny_model("olmoe")
    surgery.drop_experts(model, {0: [0, 1, 3, 4, 5]})
    torch.manual_seed(0)
    quantize_(model, QuantConfig("rtn", group_size=8, quantize_attention=True))
    return model


if __name__ == "__main__":
    expected = {}
    for name, build in (("mixtral-trimmed", trimmed), ("olmoe-rtn4", quantized)):
        model = build()
        with torch.no_grad():
            out = model.generate(torch.tensor(PROMPT), max_new_tokens=8, do_sample=False)
        moekern.save(model, HERE / name)
        expected[name] = out.tolist()
    (HERE / "expected.json").write_text(json.dumps({"prompt": PROMPT, "generated": expected}, indent=1) + "\n")
