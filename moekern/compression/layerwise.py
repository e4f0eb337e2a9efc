"""Stream calibration data through a model one decoder layer at a time.

Only the layer being processed needs to sit on the compute device; its inputs are the outputs of the layer before,
as that layer was left by the caller (quantized, pruned...), which is what GPTQ, AWQ and the similarity measures of
the trimming methods all need. Peak memory is one layer plus the activations of the calibration set.

    for index, layer, run in stream_layers(model, input_ids, device="cuda"):
        handles = add_hooks(layer)      # record what the method needs
        run()                           # the layer on every calibration batch
        change(layer)                   # e.g. quantize it; the next layer sees the changed outputs
"""

from collections.abc import Iterator

import torch

from moekern.surgery import decoder_layers


class _LastLayerReached(Exception):
    pass


def layer_inputs(model, input_ids: torch.Tensor, batch_size: int):
    """Run the model's own forward on each batch with every decoder layer stubbed out (each returns its input
    unchanged, the last one stops the forward before the final norm and the head): per batch, (the hidden states
    entering the first layer, [the kwargs the model gives layer i, for each layer i]).

    Each layer gets its own kwargs because models with per-layer attention types build one mask per type and give
    layer i the mask of config.layer_types[i] (GPT-OSS alternates sliding-window and full attention; transformers'
    causal_mask_mapping). The kwargs are what the model's forward computes from the ids and positions alone (masks,
    rotary embeddings, position ids), so skipping the layers' work does not change them. Equal kwargs of different
    layers are the same tensors, not copies."""
    layers = decoder_layers(model)
    captured, current = [], {}

    def stub(index):
        def forward(*args, **kwargs):
            hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
            if len(args) > 1:
                raise TypeError(
                    f"decoder layer {index} was called with {len(args)} positional arguments; stream_layers passes "
                    f"everything but the hidden states by keyword"
                )
            if index == 0:
                current["hidden"] = hidden.detach()
            current["kwargs"].append(kwargs)
            if index == len(layers) - 1:
                raise _LastLayerReached
            return hidden

        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = stub(index)
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                current.clear()
                current["kwargs"] = []
                try:
                    model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
                except _LastLayerReached:
                    pass
                if len(current["kwargs"]) != len(layers):
                    raise RuntimeError(
                        f"the model's forward called {len(current['kwargs'])} of its {len(layers)} decoder layers"
                    )
                captured.append((current["hidden"], current["kwargs"]))
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return captured


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def call_layer(layer, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    out = layer(_to(hidden, device), **{k: _to(v, device) for k, v in kwargs.items()})
    return out[0] if isinstance(out, tuple) else out


def stream_layers(
    model, input_ids: torch.Tensor, batch_size: int = 8, device: str | torch.device | None = None,
    offload: str | torch.device = "cpu",
) -> Iterator[tuple[int, torch.nn.Module, callable]]:
    """Yield (index, layer, run) for each decoder layer in order, with the layer on `device`.

    run() runs the layer on every calibration batch and returns the outputs. After the caller's step, the layer's
    outputs (with the weights as the caller left them) become the next layer's inputs, and the layer goes back to
    where it was. Activations wait on `offload` between layers. Each layer is called with the kwargs the model's own
    forward gives it (layer_inputs): its attention mask by its layer type, the rotary embeddings, position ids.
    """
    batches = layer_inputs(model, input_ids, batch_size)
    hiddens = [h.to(offload) for h, _ in batches]
    for index, layer in enumerate(decoder_layers(model)):
        home = next(layer.parameters()).device
        target = torch.device(device) if device is not None else home
        layer.to(target)
        kwargs = [per_layer[index] for _, per_layer in batches]  # this layer's own mask (layer_types)

        def run(layer=layer, target=target, kwargs=kwargs):
            with torch.no_grad():
                return [call_layer(layer, h, kw, target) for h, kw in zip(hiddens, kwargs, strict=True)]

        yield index, layer, run
        hiddens = [out.to(offload) for out in run()]
        layer.to(home)
