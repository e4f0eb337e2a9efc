"""The names of checkpoints only moekern can read, and their registration with transformers' Auto classes.

A compressed model whose structure transformers' own class cannot hold (a different expert count per layer, masked
experts, layers without their MoE, per-token skipping, moekern's 4-bit experts) is saved with its own `model_type`
and architecture, so that no tool loads it silently wrong:

    mixtral -> moekern_mixtral, MoekernMixtralForCausalLM     (likewise for every family moekern knows)

A standard result (Block Drop, the same Expert Drop count in every layer of a router without expert groups) keeps
its family's names and stays a plain hub checkpoint.

`import moekern` registers these names with transformers' AutoConfig and AutoModelForCausalLM, without importing
transformers: if transformers' Auto modules are loaded already, at once; otherwise right after Python imports them
(a post-import hook that waits until no transformers module is mid-import, and removes itself once both Auto modules
know the names). Then `AutoModelForCausalLM.from_pretrained`
of such a folder returns what `moekern.load` returns. Without moekern, transformers refuses the unknown model_type.
The vLLM plugin (moekern.serving.vllm_plugin) registers the same architecture names with vLLM.
"""

import importlib.abc
import sys
import warnings

from moekern.model_types import CLASS_STEMS, PREFIX, architecture, base_model_type, moekern_model_type  # noqa: F401

CONFIG_MODULE = "transformers.models.auto.configuration_auto"
MODELING_MODULE = "transformers.models.auto.modeling_auto"
_MOVED = ("base_config", "name_for_disk", "standard_architecture")  # now in moekern.config_on_disk


def __getattr__(name: str):
    if name in _MOVED:  # imported on use: `import moekern` imports this module and must not import torch
        from moekern import config_on_disk

        return getattr(config_on_disk, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Registration with transformers
# ----------------------------------------------------------------------------------------------------------------------
_registered = {"configs": False, "models": False}
_busy = []  # non-empty while registering: importing the config classes can import transformers' Auto modules again


def register_with_transformers(models: bool = True) -> None:
    """Register the moekern model types with AutoConfig and (models=True, or where transformers' Auto models are
    loaded anyway) AutoModelForCausalLM. Idempotent; a call made while one runs returns at once."""
    if _busy:
        return
    _busy.append(True)
    try:
        if not _registered["configs"]:
            from moekern.hf_configs import register_configs

            register_configs()
            _registered["configs"] = True
        if (models or MODELING_MODULE in sys.modules) and not _registered["models"]:
            from transformers.models.auto.modeling_auto import AutoModelForCausalLM

            from moekern import hf_classes

            for base, config_class in hf_classes.CONFIGS.items():
                AutoModelForCausalLM.register(config_class, hf_classes.MODELS[base], exist_ok=True)
            _registered["models"] = True
    finally:
        _busy.clear()


_importing = [0]  # how many transformers modules are being executed right now


def _register_what_is_loaded() -> None:
    if CONFIG_MODULE not in sys.modules:
        return
    try:
        register_with_transformers(models=False)  # the models too where modeling_auto is loaded
    except Exception as exc:  # never break the user's import of transformers
        warnings.warn(f"moekern could not register its model types with transformers: {exc!r}; moekern.load "
                      f"still reads moekern checkpoints", stacklevel=2)
    if all(_registered.values()):
        _remove_hook()


class _ThenRegister(importlib.abc.Loader):
    """Wraps the loader of a transformers module: runs it, then, once no transformers module is still being
    executed, registers (the config classes it imports need the modules that import them complete)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _importing[0] += 1
        try:
            self._loader.exec_module(module)
        finally:
            _importing[0] -= 1
        if not _importing[0]:
            _register_what_is_loaded()

    def __getattr__(self, name):  # get_source, get_filename, ... as the wrapped loader
        return getattr(self._loader, name)


class _AfterTransformersAuto(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for transformers' modules it asks the other finders and wraps the loader; it removes
    itself once the Auto classes know the moekern model types."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" and not fullname.startswith("transformers."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None


_HOOK = _AfterTransformersAuto()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Called by `import moekern`: register now where transformers' Auto modules are loaded, else when they are."""
    _register_what_is_loaded()
    if not all(_registered.values()) and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
