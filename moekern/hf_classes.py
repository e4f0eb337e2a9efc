"""The transformers model classes behind the moekern model types (moekern.architectures registers them; the config
classes are moekern.hf_configs'; importing this module imports transformers' config classes, so `import moekern`
does not).

    MoekernMixtralForCausalLM       what AutoModelForCausalLM picks for it: from_pretrained is moekern.load

A moekern checkpoint's structure (experts per layer, removed MoEs, 4-bit modules) is rebuilt from its recorded
decisions and from the tensors on disk, so it has no from_config: the model is built by moekern.load, which returns
the family's own transformers class with moekern's modules in it.
"""

from moekern.errors import MoekernError
from moekern.hf_configs import CONFIGS
from moekern.model_types import CLASS_STEMS, architecture

# from_pretrained arguments that change nothing for a local moekern folder (hub and Auto-class plumbing)
_IGNORED = {"_from_auto", "adapter_kwargs", "local_files_only", "cache_dir", "revision", "force_download", "proxies",
            "token", "code_revision", "_commit_hash", "low_cpu_mem_usage"}


class MoekernCausalLM:
    """Base of the per-family model classes registered with AutoModelForCausalLM."""

    config_class = None  # set per family

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """moekern.load(path, dtype, device): the model only (its tokenizer loads with AutoTokenizer as usual).
        Accepts dtype / torch_dtype, device_map (a device name) and trust_remote_code."""
        import torch

        from moekern.checkpoint import load

        if model_args:
            raise MoekernError(f"{cls.__name__}.from_pretrained takes no positional model arguments")
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        if dtype == "auto":
            dtype = None
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."))
        device = kwargs.pop("device_map", None) or "cpu"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if not isinstance(device, (str, torch.device)):
            raise MoekernError("a moekern checkpoint loads on one device: give device_map as a device name")
        trust_remote_code = bool(kwargs.pop("trust_remote_code", False))
        if kwargs.pop("subfolder", "") or kwargs.pop("use_safetensors", True) is False:
            raise MoekernError("moekern checkpoints are local folders of safetensors weights (no subfolder, no pickle)")
        unknown = sorted(k for k in kwargs if k not in _IGNORED)
        if unknown:
            raise MoekernError(f"{cls.__name__}.from_pretrained (moekern.load) does not take {', '.join(unknown)}")
        model, _ = load(pretrained_model_name_or_path, dtype=dtype, device=str(device),
                        trust_remote_code=trust_remote_code)
        return model

    @classmethod
    def from_config(cls, config, **kwargs):
        raise MoekernError(
            f"a {config.model_type} model is rebuilt from its recorded compression and the tensors on disk: load it "
            f"with AutoModelForCausalLM.from_pretrained(folder) or moekern.load(folder), not from its config alone"
        )

    _from_config = from_config


MODELS: dict[str, type] = {}
for _base in CLASS_STEMS:
    _config = CONFIGS[_base]
    _model = type(architecture(_base), (MoekernCausalLM,), {"config_class": _config, "__module__": __name__})
    globals()[_config.__name__] = _config  # its earlier home (moekern.hf_configs defines it)
    globals()[_model.__name__] = MODELS[_base] = _model  # module attributes, so that pickle finds them
