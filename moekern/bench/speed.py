"""End-to-end speed the way the paper measured it: prefill a context (2048 tokens by default), then decode tokens one
at a time with the KV cache; per batch size, the prefill throughput, the median decode step and the decode
throughput, the peak memory and the bytes floor. On a GPU, CUDA events time the steps after a warm-up; on the CPU,
time.perf_counter (CPU times say nothing about GPU kernels)."""

import gc
import statistics
import time

import torch

from moekern.bench.bandwidth import cache_bytes, decode_bytes
from moekern.bench.memory import is_out_of_memory
from moekern.model_info import peak_memory_bytes


PREFILL_REPEATS = 3  # prefills timed per measurement; the median is kept


class Timer:
    """Seconds of a block: CUDA events on a GPU (the queue is synchronised only at the end), perf_counter else."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.started


@torch.no_grad()
def prefill_and_decode(model, batch: int, context: int, decode_tokens: int, seed: int = 0,
                       prefill_repeats: int = 1) -> dict:
    """One measurement: random prompt ids [batch, context], a prefill that fills the KV cache (timed
    `prefill_repeats` times, the median kept: one prefill is a single, noisy sample), then greedy decode steps of one
    token per sequence from the last prefill's cache. Returns the times and the cache size after prefill."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
    prefills = []
    for _ in range(prefill_repeats):
        out = None  # the previous prefill's cache is freed first
        with Timer(device) as prefill:
            out = model(input_ids=ids, use_cache=True)
        prefills.append(prefill.seconds)
    cache = out.past_key_values
    kv_bytes = cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode_tokens):
        with Timer(device) as step:
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        steps.append(step.seconds)
    return {"prefill_s": statistics.median(prefills), "prefill_all_s": prefills, "decode_step_s": steps,
            "kv_cache_bytes": kv_bytes}


def warm_up(model, batch: int) -> None:
    """Compile/autotune and allocate once, outside the timed runs (a short context, two steps)."""
    prefill_and_decode(model, batch, context=16, decode_tokens=2)


def measure_batch(model, batch: int, context: int, decode_tokens: int, bandwidth: float) -> dict:
    """The speed record of one batch size (see the module docstring)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warm_up(model, batch)
    timing = prefill_and_decode(model, batch, context, decode_tokens, prefill_repeats=PREFILL_REPEATS)
    step = statistics.median(timing["decode_step_s"])
    floor = decode_bytes(model, batch, timing["kv_cache_bytes"])
    floor_s = floor["floor_bytes"] / bandwidth
    return {
        "status": "ok", "batch": batch, "context": context, "decode_tokens": decode_tokens,
        "prefill_s": timing["prefill_s"], "prefill_tok_s": batch * context / timing["prefill_s"],
        "prefill_all_s": timing["prefill_all_s"],
        "decode_step_median_s": step, "decode_tok_s": batch / step, "decode_step_s": timing["decode_step_s"],
        "peak_memory_bytes": peak_memory_bytes(device),
        **floor, "floor_step_s": floor_s, "times_floor": step / floor_s,
    }


def measure_batches(model, batch_sizes, context: int, decode_tokens: int, bandwidth: float, on_record) -> list[dict]:
    """measure_batch for each size; `on_record` gets each record as soon as it exists. A size that runs out of memory
    gives an 'oom' record and the next size goes on; any other error stops the run (the records made stay)."""
    records = []
    for batch in batch_sizes:
        try:
            record = measure_batch(model, batch, context, decode_tokens, bandwidth)
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            record = {"status": "oom", "batch": batch, "context": context, "decode_tokens": decode_tokens,
                      "error": str(exc).splitlines()[0][:200]}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        records.append(on_record(record))
    return records
