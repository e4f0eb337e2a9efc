"""The bytes floor of a decode step: what must be read from memory, over the bandwidth the device shows on a large
copy. No kernel can decode faster than that, so the ratio (measured step / floor) says how much is left to win."""

import time

import torch


def copy_bandwidth(device, megabytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second moved (read + written) by a large tensor copy on `device`, best of `repeats`."""
    device = torch.device(device)
    size = (megabytes or (1024 if device.type == "cuda" else 256)) * 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch of the pages, kernel launch
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            started = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - started
        best = min(best, seconds)
    return 2 * size / best


def expert_bytes_by_layer(model) -> list[tuple[int, int]]:
    """(experts stored, bytes of those experts) of each routed-MoE decoder layer, from the parameters and buffers
    under `.experts.` (bf16 or 4-bit alike)."""
    from moekern.surgery import decoder_layers

    found = []
    for layer in decoder_layers(model):
        tensors = [t for name, t in [*layer.named_parameters(), *layer.named_buffers()] if ".experts." in f".{name}"]
        stacked = [t for t in tensors if t.dim() >= 3]
        if stacked:
            found.append((stacked[0].shape[0], sum(t.numel() * t.element_size() for t in tensors)))
    return found


def expected_distinct_experts(experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts chosen by `tokens` tokens with top-k routing spread uniformly: each expert
    is missed by one token with probability 1 - k/E."""
    k = min(top_k, experts)
    return experts * (1.0 - (1.0 - k / experts) ** tokens)


def decode_bytes(model, batch: int, kv_cache_bytes: int) -> dict:
    """Bytes one decode step of `batch` sequences must read: every non-expert weight except the embedding table, of
    which a step reads one row per token (the lm_head reads all of its own weight, so a table tied to it counts
    whole), the experts the batch's routing selects (ESTIMATED from top_k and the batch size, as if routing were
    uniform), and the whole KV cache."""
    from moekern.model_info import describe

    facts = describe(model)
    by_layer = expert_bytes_by_layer(model)
    top_k = facts["top_k"] or 1
    selected = sum(b / n * expected_distinct_experts(n, top_k, batch) for n, b in by_layer if n)
    non_expert = facts["weight_bytes"] - sum(b for _, b in by_layer)
    table, rows = embedding_bytes(model, batch)
    non_expert += rows - table
    return {"non_expert_bytes": non_expert, "embedding_bytes": rows, "selected_expert_bytes": int(selected),
            "kv_cache_bytes": kv_cache_bytes, "floor_bytes": int(non_expert + selected + kv_cache_bytes),
            "selected_experts": "estimated (uniform routing, top_k and batch size)"}


def embedding_bytes(model, tokens: int) -> tuple[int, int]:
    """(bytes of the embedding table, bytes a step of `tokens` tokens reads from it); a table tied to the lm_head is
    read whole by the lm_head, so it counts whole in both."""
    embedding = model.get_input_embeddings().weight
    table = embedding.numel() * embedding.element_size()
    head_weight = getattr(model.get_output_embeddings(), "weight", None)
    if head_weight is not None and head_weight.data_ptr() == embedding.data_ptr():
        return table, table
    return table, min(table, tokens * embedding.shape[-1] * embedding.element_size())


def cache_bytes(past_key_values) -> int:
    """Bytes held by a transformers KV cache (any tensor it holds)."""
    total = 0
    for layer in getattr(past_key_values, "layers", []):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                total += value.numel() * value.element_size()
    return total
