"""Its earlier place: the layer-by-layer calibration pass is moekern.layerwise, shared by compress/ and quant/."""

from moekern.layerwise import call_layer, layer_inputs, stream_layers

__all__ = ["call_layer", "layer_inputs", "stream_layers"]
