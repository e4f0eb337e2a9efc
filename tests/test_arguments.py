"""Arguments checked where they enter (moekern.arguments), in the API and the CLI alike: counts that must be positive,
ids that must be integers, devices, and lengths against the model's positions. Each mistake is refused before any
work, with the argument's name; nothing is changed."""

import copy

import pytest
import torch
from tiny_models import tiny_model

import moekern
from moekern import surgery
from moekern.arguments import MoekernTypeError, check_positions, parse_device
from moekern.cli import build_parser, main
from moekern.errors import MoekernError


@pytest.mark.parametrize("options,words", [
    (dict(samples=0), ["samples must be a whole number >= 1, got 0"]),
    (dict(seq_len=0), ["seq_len must be a whole number >= 2, got 0"]),
    (dict(seq_len=1), ["seq_len must be a whole number >= 2, got 1"]),
    (dict(samples=2.5), ["samples must be a whole number", "float 2.5"]),
    (dict(batch_size=-1), ["batch_size must be a whole number >= 1, got -1"]),
    (dict(seed="0"), ["seed must be an integer, got str '0'"]),
    (dict(device="gpu"), ["unknown device 'gpu'"]),
    (dict(order="XS"), ["order must be 'ST'"]),
])
def test_compress_refuses_bad_options_before_any_work(monkeypatch, options, words):
    from moekern.compression import calibration

    def no_work(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(calibration, "calibration_blocks", no_work)
    model = tiny_model("mixtral")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(MoekernError) as caught:
        moekern.compress(model, "layer-drop=1", tokenizer=object(), **options)
    assert all(w in str(caught.value) for w in words), str(caught.value)
    assert not hasattr(model.config, surgery.KEY)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_the_order_ignores_case_like_the_recipe():
    model = tiny_model("mixtral")
    ids = torch.randint(3, 97, (2, 8))
    result = moekern.compress(model, "LAYER-DROP=1", ids, order="ts")
    assert result.config.moekern["recipe_order"] == "TS"
    parser = build_parser()
    assert parser.parse_args(["compress", "m", "--recipe", "rtn4", "--out", "x", "--order", "ts"]).order == "TS"
    assert parser.parse_args(["paper", "--order", "Ts"]).order == "TS"


def test_calibration_longer_than_the_positions_or_outside_the_vocabulary():
    model = tiny_model("mixtral")  # 64 positions, 97 tokens
    with pytest.raises(MoekernError, match=r"= 65 is longer than the model's 64 positions"):
        moekern.compress(model, "layer-drop=1", torch.randint(3, 97, (2, 65)))
    with pytest.raises(MoekernError, match=r"token ids must be in 0..96 \(the vocabulary\), got 3..500"):
        moekern.compress(model, "layer-drop=1", torch.tensor([[3, 500, 7, 8]]))


def test_a_model_with_rope_scaling_gets_a_warning_instead():
    config = copy.deepcopy(tiny_model("mixtral").config)
    check_positions(config, 64, "--seq-len")
    with pytest.raises(MoekernError, match="--seq-len = 65"):
        check_positions(config, 65, "--seq-len")
    config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 64}
    with pytest.warns(UserWarning, match=r"--seq-len = 65 is beyond the model's 64 positions .*; its yarn RoPE"):
        check_positions(config, 65, "--seq-len")


def test_surgery_takes_integer_ids_in_the_shapes_it_documents():
    model = tiny_model("mixtral")
    cases = [
        (lambda: surgery.drop_experts(model, {1: [0.2, 1.7, 2.9]}), "layer 1: the expert ids must be integers"),
        (lambda: surgery.drop_experts(model, [0, 1, 2]), "kept must be a mapping {layer: [expert ids to keep]}"),
        (lambda: surgery.drop_experts(model, {"1": [0, 1]}), "layer ids must be integers, got str '1'"),
        (lambda: surgery.drop_experts(model, {1: 3}), "expert ids must be a list of integer ids, got int 3"),
        (lambda: surgery.set_skip_beta(model, "abc"), "betas must be a mapping"),
        (lambda: surgery.set_skip_beta(model, {1: "0.5"}), "skip beta must be a number in [0, 1], got str '0.5'"),
        (lambda: surgery.set_skip_beta(model, {1: True}), "skip beta must be a number"),
        (lambda: surgery.remove_blocks(model, 2), "remove_blocks: layers must be a list of integer ids, got int 2 "
                                                  "(to remove layer 3 pass [3]"),
        (lambda: surgery.remove_blocks(model, [1.0]), "remove_blocks: layers must be integers, got float 1.0"),
        (lambda: surgery.remove_moe_layers(model, 1), "layer-drop=N"),
    ]
    for call, message in cases:
        with pytest.raises(TypeError) as caught:  # a TypeError, and a MoekernError for the CLI
            call()
        assert isinstance(caught.value, MoekernTypeError) and message in str(caught.value), str(caught.value)
    with pytest.raises(MoekernError, match=r"skip beta must be in \[0, 1\], got nan"):
        surgery.set_skip_beta(model, {1: float("nan")})
    assert surgery.decisions(model)["kept_experts"] == [None] * 3 and len(surgery.decoder_layers(model)) == 3
    surgery.drop_experts(model, {torch.tensor(1): torch.tensor([0, 1, 4])})  # integer tensors are integers
    assert surgery.decisions(model)["kept_experts"][1] == [0, 1, 4]


@pytest.mark.parametrize("text,expected", [("cpu", "cpu"), ("CUDA", "cuda"), ("cuda:1", "cuda:1"), ("gpu", None),
                                           ("cuda:x", None), ("mps", None), ("", None)])
def test_device_names(text, expected):
    if expected is None:
        with pytest.raises(MoekernError, match="unknown device"):
            parse_device(text)
    else:
        assert parse_device(text) == expected


def test_cli_refusals_exit_2_in_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["info", "--device", "gpu"])
    assert caught.value.code == 2 and "unknown device 'gpu'" in capsys.readouterr().err
    for argv, words in [  # the shipped model has no RoPE scaling: an error, not a warning
        (["bench", "shipped", "--context", "100000", "--device", "cpu", "--out", str(tmp_path / "b")],
         ["--context + --decode-tokens = 100064 is longer than the model's 2048 positions"]),
        (["compress", "shipped", "--recipe", "layer-drop=1", "--seq-len", "4096", "--device", "cpu",
          "--out", str(tmp_path / "c")], ["--seq-len = 4096 is longer than the model's 2048 positions"]),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists() and not list((tmp_path / "b").glob("*.jsonl"))
