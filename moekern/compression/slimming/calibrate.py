"""Calibration for quantization and pruning: stream the calibration ids through the model one decoder layer at a
time (moekern.compression.layerwise.stream_layers), and record, for the layer at hand only, the inputs each routed
expert receives (from the routing the model really makes) and the inputs of the other linears to compress.

Peak memory: one layer on the compute device, plus that layer's captured inputs; nothing is kept across layers.
"""

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from moekern.compression.layerwise import stream_layers
from moekern.errors import MoekernError
from moekern.surgery import decoder_layers


def check_calibration(model, calibration, method: str) -> torch.Tensor:
    """Calibration ids must be integer token ids [n, L] within the vocabulary."""
    if calibration is None:
        raise MoekernError(f"{method} needs calibration data: token ids as a LongTensor [n, L] (e.g. 128 x 2048)")
    if not isinstance(calibration, torch.Tensor):
        raise MoekernError(
            f"calibration must be a torch LongTensor [n, L] of token ids, got {type(calibration).__name__}"
        )
    if calibration.is_floating_point() or calibration.is_complex() or calibration.dtype == torch.bool:
        raise MoekernError(
            f"calibration must hold integer token ids (a LongTensor [n, L]), got dtype {calibration.dtype}; "
            f"tokenize the text first"
        )
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise MoekernError(
            f"calibration must be a non-empty [n, L] tensor of token ids, got shape {tuple(calibration.shape)}"
        )
    vocab = model.get_input_embeddings().weight.shape[0]
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or high >= vocab:
        raise MoekernError(f"calibration ids must be in [0, {vocab}) (the vocabulary), found [{low}, {high}]")
    return calibration.long()


def _check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise MoekernError(
            f"calibration produced NaN or inf in the inputs of {where}; the model (or its dtype) is broken for "
            f"these ids. Check the weights, or calibrate in float32"
        )


class LayerCapture:
    """While active, records the inputs of one decoder layer's routed experts (per stored expert row), with the
    routing weight each token gave that expert, and the inputs of the given linears. expert_inputs(e) /
    linear_inputs(name): [rows, K] tensors; expert_routing_weights(e): [rows] (the factor the expert's output is
    multiplied by in the model, summed over the token's slots that chose e)."""

    def __init__(self, layer_index: int, experts: nn.Module | None, linears: dict[str, nn.Module]):
        self.layer_index, self.experts, self.linears = layer_index, experts, linears
        self._experts = defaultdict(list)
        self._routing = defaultdict(list)
        self._linears = defaultdict(list)
        self._handles = []

    def _tap(self, hidden, ids, weights):
        _check_finite(hidden, f"the experts of layer {self.layer_index}")
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        ids = ids.reshape(hidden.shape[0], -1)
        weights = weights.detach().reshape(hidden.shape[0], -1)
        for e in ids.unique().tolist():
            if e >= 0:
                chosen = ids == e
                rows = chosen.any(dim=-1)
                self._experts[e].append(hidden[rows])
                self._routing[e].append((weights.float() * chosen).sum(dim=-1)[rows])

    def __enter__(self):
        if self.experts is not None:
            self.experts.calibration_tap = self._tap
        for name, module in self.linears.items():
            def hook(module, args, name=name):
                x = args[0].detach()
                _check_finite(x, f"{name} of layer {self.layer_index}")
                self._linears[name].append(x.reshape(-1, x.shape[-1]))
            self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        if self.experts is not None and "calibration_tap" in self.experts.__dict__:
            del self.experts.calibration_tap
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def expert_inputs(self, row: int) -> torch.Tensor | None:
        found = self._experts.get(row)
        return torch.cat(found) if found else None

    def expert_routing_weights(self, row: int) -> torch.Tensor | None:
        found = self._routing.get(row)
        return torch.cat(found) if found else None

    def linear_inputs(self, name: str) -> torch.Tensor | None:
        found = self._linears.get(name)
        return torch.cat(found) if found else None


@contextmanager
def experts_through_moekern(model):
    """Route every experts call through moekern.modules.experts.experts_forward (where the calibration tap sits) for
    the duration, then give the model back the experts implementation it had (without unpatch's block swaps)."""
    from transformers.integrations.moe import ExpertsInterface

    from moekern.modules.experts import experts_forward
    from moekern.patching import IMPLEMENTATION

    ExpertsInterface.register(IMPLEMENTATION, experts_forward)
    previous = model.config._experts_implementation
    if previous != IMPLEMENTATION:
        model.set_experts_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        if previous != IMPLEMENTATION and previous is not None:
            model.set_experts_implementation(previous)


def calibrated_layers(
    model, calibration: torch.Tensor, choose, desc: str, device=None, batch_size: int = 8
) -> Iterator[tuple[int, nn.Module, LayerCapture]]:
    """For each decoder layer: run it on the calibration stream with a capture of (experts, linears) = choose(layer)
    active, and yield (index, layer, capture). The caller compresses the layer before asking for the next one; the
    next layer then sees this layer's compressed outputs."""
    layers = len(decoder_layers(model))
    with experts_through_moekern(model):
        stream = stream_layers(model, calibration, batch_size=batch_size, device=device)
        for index, layer, run in tqdm(stream, total=layers, desc=desc, unit="layer"):
            experts, linears = choose(layer)
            capture = LayerCapture(index, experts, linears)
            with capture:
                run()
            yield index, layer, capture
            del capture
