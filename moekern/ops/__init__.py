"""Kernels: they know tensors, not models. `reference` is the plain-PyTorch oracle of every kernel."""
