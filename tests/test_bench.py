"""moekern bench: records appended as measured, the baseline and the variant side by side, presets without a
download, out-of-memory per batch size, interrupts that keep what was measured. No timed assertions."""

import json

import pytest
import torch

from moekern.bench import speed
from moekern.bench.bandwidth import expected_distinct_experts
from moekern.cli import main


def records(path, kind=None):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if kind is None or r["kind"] == kind]


def test_bench_shipped_measures_baseline_and_moekern(tmp_path, capsys):
    assert main(["bench", "shipped", "--context", "32", "--batch-sizes", "1,2", "--decode-tokens", "3",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = tmp_path / "bench.jsonl"
    (run,) = records(out, "run")
    assert run["context"] == 32 and run["device"] == "cpu"
    assert any("CPU" in note for note in run["notes"])
    models = records(out, "model")
    assert [m["variant"] for m in models] == ["transformers", "moekern"]
    assert models[0]["flops"] == models[1]["flops"] > 0  # the same math, counted the same way
    assert models[0]["weight_bytes"] == models[1]["weight_bytes"]
    speeds = records(out, "speed")
    assert [(s["variant"], s["batch"]) for s in speeds] == [("transformers", 1), ("transformers", 2),
                                                          ("moekern", 1), ("moekern", 2)]
    for s in speeds:
        assert s["status"] == "ok" and len(s["decode_step_s"]) == 3
        assert s["decode_tok_s"] == pytest.approx(s["batch"] / s["decode_step_median_s"])
        assert s["prefill_tok_s"] == pytest.approx(s["batch"] * 32 / s["prefill_s"])
        assert s["floor_bytes"] == s["non_expert_bytes"] + s["selected_expert_bytes"] + s["kv_cache_bytes"]
        assert s["kv_cache_bytes"] > 0 and s["peak_memory_bytes"] > 0
    assert "x floor" in capsys.readouterr().out


def test_bench_a_shrunk_preset_without_download(tmp_path):
    assert main(["bench", "olmoe-1b-7b", "--layers", "1", "--context", "8", "--batch-sizes", "1",
                 "--decode-tokens", "2", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    out = tmp_path / "bench.jsonl"
    (run,) = records(out, "run")
    assert run["preset"] == "olmoe-1b-7b" and run["source"] == "allenai/OLMoE-1B-7B-0924"
    assert any("first 1 of 16 layers" in n for n in run["notes"])
    assert any("near uniformly" in n for n in run["notes"])
    assert all(m["layers"] == 1 and m["experts"] == 64 for m in records(out, "model"))
    assert [s["status"] for s in records(out, "speed")] == ["ok", "ok"]


def test_presets_build_every_family_shrunk():
    from moekern.bench.presets import PRESETS, preset_config

    for name in PRESETS:
        config = preset_config(name, layers=2)
        assert config.num_hidden_layers == 2
    assert preset_config("deepseek-moe-16b").n_shared_experts == 2


@pytest.mark.parametrize("args,message", [
    (["bench", "mixtral-9x9b"], "neither a local model folder nor a preset; presets: mixtral-8x7b"),
    (["bench", "shipped", "--layers", "2"], "--layers shrinks a preset only"),
    (["bench", "olmoe-1b-7b", "--layers", "99"], "has only 16 layers"),
    (["bench", "shipped", "--recipe", "frobnicate=3"], "frobnicate"),
])
def test_bench_mistakes_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is moekern-runs in the current folder: not the checkout's
    assert main([*args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_batch_sizes_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "shipped", "--batch-sizes", "1,0"])
    assert exit_.value.code == 2
    assert "comma-separated positive integers" in capsys.readouterr().err


def test_out_of_memory_is_reported_and_the_next_size_goes_on(shipped, monkeypatch):
    model, _ = shipped
    real = speed.measure_batch

    def measure(model, batch, *rest):
        if batch == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(model, batch, *rest)

    monkeypatch.setattr(speed, "measure_batch", measure)
    made = speed.measure_batches(model, [1, 2, 3], 16, 2, bandwidth=1e10, on_record=lambda r: r)
    assert [(r["batch"], r["status"]) for r in made] == [(1, "ok"), (2, "oom"), (3, "ok")]
    assert "Tried to allocate" in made[1]["error"]


def test_a_runtime_error_saying_out_of_memory_counts_too(shipped, monkeypatch):
    model, _ = shipped
    monkeypatch.setattr(speed, "measure_batch", lambda *a: (_ for _ in ()).throw(
        RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory: you tried to allocate; out of memory")))
    assert speed.measure_batches(model, [1], 16, 2, 1e10, lambda r: r)[0]["status"] == "oom"


def test_interrupt_at_the_second_size_keeps_the_first_line(tmp_path, monkeypatch, capsys):
    real = speed.measure_batch

    def measure(model, batch, *rest):
        if batch == 2:
            raise KeyboardInterrupt
        return real(model, batch, *rest)

    monkeypatch.setattr(speed, "measure_batch", measure)
    assert main(["bench", "shipped", "--context", "16", "--batch-sizes", "1,2,4", "--decode-tokens", "2",
                 "--device", "cpu", "--out", str(tmp_path)]) == 130
    speeds = records(tmp_path / "bench.jsonl", "speed")
    assert [(s["variant"], s["batch"], s["status"]) for s in speeds] == [("transformers", 1, "ok")]
    assert "interrupted" in capsys.readouterr().err


def test_expected_distinct_experts():
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2)
    assert expected_distinct_experts(64, 8, 1000) == pytest.approx(64)
    assert 2 < expected_distinct_experts(8, 2, 4) < 8


def test_weight_bytes_count_the_4bit_buffers(shipped):
    """moekern's 4-bit experts keep their packed weights as buffers: the bench counts them as weights."""
    import copy

    import moekern
    from moekern.bench.bandwidth import decode_bytes, expert_bytes_by_layer
    from moekern.model_info import describe

    model = moekern.compress(copy.deepcopy(shipped[0]), "rtn4")
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "qweight" in n)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert buffers > 0 and describe(model)["weight_bytes"] >= params + buffers
    floor = decode_bytes(model, batch=64, kv_cache_bytes=0)  # batch 64, top-2 of 8: every expert is read
    assert floor["non_expert_bytes"] + sum(b for _, b in expert_bytes_by_layer(model)) == describe(model)["weight_bytes"]
    assert floor["selected_expert_bytes"] == pytest.approx(sum(b for _, b in expert_bytes_by_layer(model)), rel=1e-3)


def test_the_floor_reads_one_embedding_row_per_token():
    """A decode step reads one row of the embedding table per token; the lm_head reads all of its weight, so a table
    tied to it counts whole."""
    from tiny_models import tiny_model

    from moekern.bench.bandwidth import decode_bytes, expert_bytes_by_layer
    from moekern.model_info import describe

    model = tiny_model("mixtral")
    table = model.get_input_embeddings().weight
    assert table.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    row = table.shape[1] * table.element_size()
    others = describe(model)["weight_bytes"] - sum(b for _, b in expert_bytes_by_layer(model))
    floor = decode_bytes(model, batch=3, kv_cache_bytes=0)
    assert floor["embedding_bytes"] == 3 * row
    assert floor["non_expert_bytes"] == others - table.numel() * table.element_size() + 3 * row
    model.lm_head.weight = table  # tied, as the shipped model is
    tied = decode_bytes(model, batch=3, kv_cache_bytes=0)
    assert tied["embedding_bytes"] == table.numel() * table.element_size()


def test_flops_of_4bit_experts_are_those_of_the_dense_ones(shipped):
    """4-bit experts do the dense experts' matmuls: the counter must see them whichever kernels the model runs
    (the C++ CPU kernels and the Triton ones are invisible to it, so counting runs the reference)."""
    import copy

    import moekern
    from moekern.bench.flops import forward_flops

    model, _ = shipped
    dense = forward_flops(model, 16)
    quantized = moekern.compress(copy.deepcopy(model), "rtn4")
    assert forward_flops(quantized, 16) == dense > 0
