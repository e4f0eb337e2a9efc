"""Fine-tuning compressed models: the loss goes down, what must stay fixed stays bit-identical, a resumed run reaches
the weights of an uninterrupted one, the result reloads, the LoRA adapters compute what their merged weights
compute, and bad input gets a one-line error with the source checkpoint untouched."""

import hashlib
import json

import pytest
import torch
from tiny_models import rel_err, tiny_model
from transformers import AutoModelForCausalLM

import moekern
from moekern import surgery
from moekern.errors import MoekernError
from moekern.finetuning import FinetuneConfig, LoraSpec
from moekern.finetuning.data import IGNORE, PROMPT_NO_INPUT, load_examples
from moekern.finetuning.lora import ATTR, ExpertsLora, attach, unload
from moekern.finetuning.run import finetune
from moekern.modules.quant import QuantizedExperts

TEXT = "\n".join(f"The with statement number {i} calls __enter__ and then __exit__ of the context manager {i % 5}."
                 for i in range(60))
ALPACA = [{"instruction": f"Name context manager {i}.", "input": "" if i % 2 else "with open(f)",
           "output": f"It is manager {i}."} for i in range(20)]
FAST = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, warmup_ratio=0.0, seq_len=32)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from moekern.shipped import MODEL_DIR

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def small(family="mixtral", **overrides):
    """A tiny model with the shipped tokenizer's vocabulary, so real text can train it."""
    return tiny_model(family, vocab_size=4096, **overrides)


def compressed():
    """Every kind of trimming: experts sliced and masked, a MoE layer removed, a block removed."""
    model = small(num_hidden_layers=5)
    surgery.drop_experts(model, {0: [0, 2, 3, 5]})
    surgery.drop_experts(model, {3: [0, 1, 4]}, mask_only=True)
    surgery.remove_moe_layers(model, [4])
    surgery.remove_blocks(model, [1])
    return model


def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return path


def folder_digest(path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------
def test_plain_text_is_packed_into_blocks_of_the_token_stream(tmp_path, tokenizer):
    examples = load_examples(text_file(tmp_path), tokenizer, 16)
    stream = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert examples.kind == "text" and len(examples) == len(stream) // 16
    assert torch.equal(torch.cat(examples.input_ids), torch.tensor(stream[: len(examples) * 16]))
    assert all(torch.equal(i, lab) for i, lab in zip(examples.input_ids, examples.labels))


def test_alpaca_formats_learn_only_the_response(tmp_path, tokenizer):
    import datasets

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ALPACA))
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    found = [load_examples(tmp_path / name, tokenizer, 128) for name in ("a.jsonl", "a.json", "saved")]
    assert all(e.kind == "instruction" and len(e) == len(ALPACA) for e in found)
    assert all(torch.equal(a, b) for e in found[1:] for a, b in zip(found[0].labels, e.labels))
    record = ALPACA[1]  # no input: the short template
    prompt = tokenizer(PROMPT_NO_INPUT.format(instruction=record["instruction"]))["input_ids"]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, labels = found[0].input_ids[1], found[0].labels[1]
    assert ids.tolist() == prompt + response
    assert labels.tolist() == [IGNORE] * len(prompt) + response
    batch = found[0].batch([0, 1], pad_id=0)  # right-padded; padding is masked out and never a target
    short = int(batch["attention_mask"].sum(1).min())
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all() and short < batch["input_ids"].shape[1]
    lengths = sorted(len(tokenizer(PROMPT_NO_INPUT.format(instruction=r["instruction"]))["input_ids"])
                     for r in ALPACA if not r["input"])
    cut = load_examples(tmp_path / "a.jsonl", tokenizer, lengths[-1] + 1)  # the long prompts fill the cut
    assert cut.dropped == len(ALPACA) - len(cut) > 0
    assert all((lab != IGNORE).sum() >= 1 for lab in cut.labels)
    with pytest.raises(MoekernError, match="no response token is left"):
        load_examples(tmp_path / "a.jsonl", tokenizer, lengths[0] - 1)


def test_a_text_dataset_folder_is_packed(tmp_path, tokenizer):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": TEXT}])}).save_to_disk(str(tmp_path / "d"))
    assert torch.equal(torch.cat(load_examples(tmp_path / "d", tokenizer, 16).input_ids),
                       torch.cat(load_examples(text_file(tmp_path), tokenizer, 16).input_ids))


# ----------------------------------------------------------------------------------------------------------------------
# Training: the loss goes down; what must stay fixed stays bit-identical
# ----------------------------------------------------------------------------------------------------------------------
def test_full_finetuning_learns_and_keeps_the_compression_fixed(tmp_path, tokenizer):
    model = compressed()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    decisions = json.loads(json.dumps(surgery.decisions(model)))
    data = text_file(tmp_path)
    config = FinetuneConfig(max_steps=12, learning_rate=3e-3, weight_decay=0.1, **FAST)
    result = finetune(model, data, None, config, tokenizer=tokenizer, eval_data=data, progress=False)
    report, tuned = result.report, result.model
    assert report["perplexity"]["after"] < 0.8 * report["perplexity"]["before"]  # scored on the training text
    assert report["log"][-1]["loss"] < report["log"][0]["loss"]
    assert report["frozen_check"]["bit_identical"] and report["method"] == "full"

    after = dict(tuned.named_parameters())
    assert set(after) == set(before)  # nothing removed comes back
    assert all(torch.equal(model.get_parameter(n), before[n]) for n in before)  # the source model is a copy
    routers = [n for n in before if ".mlp.gate." in n]
    assert routers and all(torch.equal(after[n], before[n]) for n in routers)
    masked = after["model.layers.2.mlp.experts.gate_up_proj"]  # original layer 3: experts 2, 3, 5 masked, stored
    assert torch.equal(masked[[2, 3, 5]], before["model.layers.2.mlp.experts.gate_up_proj"][[2, 3, 5]])
    assert not torch.equal(masked[0], before["model.layers.2.mlp.experts.gate_up_proj"][0])
    trained = [n for n in before if n not in routers and not torch.equal(after[n], before[n])]
    assert len(trained) > len(before) // 2
    d = {k: v for k, v in surgery.decisions(tuned).items() if k != "finetune"}
    assert d == decisions and surgery.decisions(tuned)["finetune"][0]["steps"] == 12


def test_train_router_trains_it_with_the_models_aux_loss(tmp_path, tokenizer):
    model = small(num_hidden_layers=2)
    surgery.drop_experts(model, {0: [0, 2, 3, 5]}, mask_only=True)
    model.config.router_aux_loss_coef = 0.02
    config = FinetuneConfig(max_steps=3, learning_rate=3e-3, weight_decay=0.1, train_router=True, **FAST)
    result = finetune(model, text_file(tmp_path), None, config, tokenizer=tokenizer, progress=False)
    router, tuned = model.model.layers[0].mlp.gate.weight, result.model.model.layers[0].mlp.gate.weight
    assert not torch.equal(tuned[[0, 2]], router[[0, 2]])  # live experts' router rows move
    assert torch.equal(tuned[[1, 4]], router[[1, 4]])  # masked experts' rows stay, despite weight decay
    assert "router trained" in result.report["how"]


def test_qlora_keeps_4bit_weights_bit_identical_and_reloads_with_its_adapters(tmp_path, tokenizer):
    from moekern.compression.slimming import QuantConfig, quantize_

    model = small(num_hidden_layers=3)
    surgery.remove_blocks(model, [1])
    quantize_(model, QuantConfig("rtn", group_size=8))
    buffers = {n: b.clone() for n, b in model.named_buffers() if "proj_" in n}
    assert buffers
    src = tmp_path / "q"
    moekern.save(model, src, tokenizer=tokenizer)
    with pytest.raises(MoekernError, match="--lora"):
        finetune(src, text_file(tmp_path), tmp_path / "no", FinetuneConfig(max_steps=2, **FAST), progress=False)

    config = FinetuneConfig(max_steps=8, learning_rate=3e-3, lora=LoraSpec(r=4, alpha=8), **FAST)
    result = finetune(src, text_file(tmp_path), tmp_path / "out", config, eval_data=text_file(tmp_path),
                      progress=False)
    tuned = result.model
    assert result.report["method"] == "qlora" and result.report["frozen_check"]["bit_identical"]
    assert result.report["perplexity"]["after"] < result.report["perplexity"]["before"]
    assert all(torch.equal(tuned.get_buffer(n), b) for n, b in buffers.items())
    adapters = [m.lora_experts for m in tuned.modules() if isinstance(m, QuantizedExperts)]
    assert len(adapters) == 2 and all(a.gate_up_proj_B.abs().sum() > 0 for a in adapters)
    assert result.report["lora"]["adapted"]["linears"]  # the 16-bit attention had peft's LoRA, merged

    loaded, _ = moekern.load(tmp_path / "out")
    ids = torch.randint(3, 4096, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tuned(ids).logits)
    assert all(torch.equal(loaded.get_buffer(n), b) for n, b in buffers.items())


def test_qlora_merge_rounds_onto_the_4bit_grid(tmp_path, tokenizer):
    from moekern.compression.slimming import QuantConfig, quantize_

    model = small(num_hidden_layers=2)
    quantize_(model, QuantConfig("rtn", group_size=8))
    scales = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("_scales", "_zeros"))}
    config = FinetuneConfig(max_steps=6, learning_rate=2e-2, lora=LoraSpec(r=4, alpha=8, targets=("experts",),
                                                                           merge=True), **FAST)
    result = finetune(model, text_file(tmp_path), None, config, tokenizer=tokenizer, eval_data=text_file(tmp_path),
                      progress=False)
    tuned = result.model
    assert not any(hasattr(m, ATTR) for m in tuned.modules())  # merged
    assert all(torch.equal(tuned.get_buffer(n), b) for n, b in scales.items())  # the grid is the same
    assert "after_unmerged" in result.report["perplexity"]
    changed = [n for n, b in model.named_buffers() if n.endswith("qweight") and not torch.equal(tuned.get_buffer(n), b)]
    assert changed  # large updates survive the rounding


# ----------------------------------------------------------------------------------------------------------------------
# The adapters compute what their merged weights compute
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_lora_forward_equals_the_merged_model(family):
    model = tiny_model(family)
    surgery.drop_experts(model, {surgery.moe_layer_ids(model)[0]: [1, 2, 4]})
    moekern.patch(model)
    attach(model, LoraSpec(r=3, alpha=6))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)  # B starts at zero: give the update a value
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        adapted = model(ids).logits
        unload(model)
        assert not any(hasattr(m, ATTR) for m in model.modules())
        merged = model(ids).logits
    assert rel_err(adapted, merged) <= 1e-5


def test_qlora_forward_and_gradient_match_the_dequantized_reference():
    from moekern.ops import reference
    from moekern.compression.slimming import QuantConfig, quantize_

    model = tiny_model("mixtral")
    quantize_(model, QuantConfig("awq", group_size=8), calibration=torch.randint(3, 97, (4, 16)))
    experts = next(m for m in model.modules() if isinstance(m, QuantizedExperts))
    adapter = ExpertsLora.for_experts(experts, r=2, alpha=4)
    with torch.no_grad():
        adapter.gate_up_proj_B.normal_(0, 0.3)
        adapter.down_proj_B.normal_(0, 0.3)
    x = torch.randn(9, 32, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, -1], [5, 0]] * 3)
    weights = torch.rand(9, 2)
    out = adapter(experts, x, ids, weights)
    E = experts.num_experts
    w_gu = torch.stack([experts.dequantized("gate_up_proj", e) + adapter.delta("gate_up_proj", e) for e in range(E)])
    w_d = torch.stack([experts.dequantized("down_proj", e) + adapter.delta("down_proj", e) for e in range(E)])
    x_ref = x.detach().clone().requires_grad_(True)
    expected = reference.moe_experts(x_ref, ids, weights, w_gu, w_d, act=experts.act)
    assert rel_err(out, expected) <= 1e-5
    out.sum().backward()
    expected.sum().backward()
    assert rel_err(x.grad, x_ref.grad) <= 1e-5
    assert adapter.gate_up_proj_A.grad is not None and adapter.gate_up_proj_A.grad[[3, 4]].abs().sum() == 0


# ----------------------------------------------------------------------------------------------------------------------
# Resume, reload, skip thresholds
# ----------------------------------------------------------------------------------------------------------------------
def test_a_resumed_run_reaches_the_weights_of_an_uninterrupted_one(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model = compressed()
    src = tmp_path / "src"
    moekern.save(model, src, tokenizer=tokenizer)
    data = text_file(tmp_path)
    config = FinetuneConfig(max_steps=5, learning_rate=3e-3, weight_decay=0.1, save_steps=2, seed=3,
                            per_device_train_batch_size=2, gradient_accumulation_steps=2, seq_len=32, eval_tokens=64)
    whole = finetune(src, data, tmp_path / "whole", config, progress=False)
    cut = finetune(src, data, tmp_path / "cut", config, progress=False, stop_after=3)
    assert cut.out is None and not (tmp_path / "cut").exists()  # interrupted: no model written
    assert sorted(p.name for p in (tmp_path / "cut-checkpoints").iterdir()) == ["checkpoint-2"]
    resumed = finetune(src, data, tmp_path / "cut", config, progress=False, resume="latest")
    assert resumed.report["resumed_from"].endswith("checkpoint-2")
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in resumed.report["log"]] == [e["loss"] for e in whole.report["log"]]
    assert whole.report["checkpoints"] == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]

    other = FinetuneConfig(**{**config.__dict__, "learning_rate": 1e-3})
    with pytest.raises(MoekernError, match="another run"):
        finetune(src, data, tmp_path / "cut", other, progress=False, resume="latest")


def test_the_result_reloads_with_moekern_load_and_from_pretrained(tmp_path, tokenizer):
    model = small(num_hidden_layers=3)
    surgery.remove_blocks(model, [1])  # a standard architecture: transformers loads it too
    config = FinetuneConfig(max_steps=3, learning_rate=1e-3, lora=LoraSpec(r=4, targets=("attention", "experts")),
                            **FAST)
    tuned = finetune(model, text_file(tmp_path), tmp_path / "out", config, tokenizer=tokenizer,
                     progress=False).model
    assert (tmp_path / "out" / "finetune_report.md").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["moekern"]["finetune"][0]["method"] == "lora"
    ids = torch.randint(3, 4096, (2, 9))
    with torch.no_grad():
        expected = tuned(ids).logits
        loaded, _ = moekern.load(tmp_path / "out")  # transformers' own experts path: equal up to rounding
        assert rel_err(loaded(ids).logits, expected) <= 1e-5
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert rel_err(plain(ids).logits, expected) <= 1e-5


def test_skip_thresholds_are_measured_again_after_training(tmp_path, tokenizer):
    model = small(num_hidden_layers=2)
    compressed_model = moekern.compress(model, "skip", calibration=torch.randint(3, 4096, (4, 32)))
    config = FinetuneConfig(max_steps=3, learning_rate=3e-3, **FAST)
    result = finetune(compressed_model, text_file(tmp_path), None, config, tokenizer=tokenizer, progress=False)
    skip = result.report["skip"]
    assert skip["quantile"] == 0.5 and set(skip["before"]) == set(skip["after"]) == {"0", "1"}
    assert surgery.decisions(result.model)["skip_beta"] == [skip["after"]["0"], skip["after"]["1"]]
    assert skip["max_abs_change"] == max(abs(skip["after"][i] - skip["before"][i]) for i in ("0", "1")) > 0


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, the checkpoint untouched and nothing written
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("src") / "model"
    moekern.save(compressed(), path, tokenizer=tokenizer)
    return path


def _write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize("case, expected", [
    ("empty", "is empty"),
    ("malformed", "line 2: not a JSON record"),
    ("fields", "neither a string 'text' field"),
    ("not_a_model", "no config.json"),
    ("targets", "LoRA target 'shared' matches nothing"),
    ("typo_target", "LoRA target 'qq_proj' matches nothing"),
    ("lr_zero", "--learning-rate must be > 0"),
    ("lr_negative", "--learning-rate must be > 0"),
    ("one_batch", "fewer than one batch"),
    ("short_text", "fewer than one block"),
])
def test_bad_input_is_one_line_and_leaves_everything_untouched(tmp_path, saved, capsys, case, expected):
    from moekern.cli import main

    data = str(text_file(tmp_path))
    model = str(saved)
    extra = []
    if case == "empty":
        data = _write(tmp_path, "empty.jsonl", "\n \n")
    elif case == "malformed":
        data = _write(tmp_path, "bad.jsonl", json.dumps(ALPACA[0]) + "\n{'instruction': 1,\n")
    elif case == "fields":
        data = _write(tmp_path, "fields.jsonl", json.dumps({"prompt": "a", "completion": "b"}))
    elif case == "not_a_model":
        model = str(tmp_path)
    elif case == "targets":
        extra = ["--lora", "--lora-targets", "attention,shared"]
    elif case == "typo_target":
        extra = ["--lora", "--lora-targets", "qq_proj"]
    elif case == "lr_zero":
        extra = ["--learning-rate", "0"]
    elif case == "lr_negative":
        extra = ["--learning-rate=-1e-5"]
    elif case == "one_batch":
        extra = ["--per-device-train-batch-size", "8", "--gradient-accumulation-steps", "64"]
    elif case == "short_text":
        data = _write(tmp_path, "short.txt", "Too short.")
    digest = folder_digest(saved)
    out = tmp_path / "out"
    code = main(["finetune", model, "--data", data, "--out", str(out), "--max-steps", "2", "--seq-len", "32",
                 "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("moekern finetune: error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert folder_digest(saved) == digest
    assert not out.exists() and not (tmp_path / "out-checkpoints").exists()


def test_the_command_end_to_end(tmp_path, saved, capsys):
    from moekern.cli import main

    code = main(["finetune", str(saved), "--data", str(text_file(tmp_path)), "--out", str(tmp_path / "ft"),
                 "--max-steps", "2", "--seq-len", "32", "--per-device-train-batch-size", "2",
                 "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--lora", "--eval-tokens", "64"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "method      lora: LoRA r=16 alpha=32 (router frozen); adapters merged" in printed
    assert "perplexity " in printed and "bit-identical" in printed
    assert (tmp_path / "ft-checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    report = json.loads((tmp_path / "ft" / "finetune_report.json").read_text())
    assert report["steps"] == 2 and report["lora"]["adapted"]["experts"]
    loaded, _ = moekern.load(tmp_path / "ft")
    assert loaded.config.moekern["dropped_blocks"] == [1]
