"""Reading a local model folder, for every loader of moekern (moekern.load, the AutoAWQ / GPTQ import of
moekern.quantized_folders): which folder a name means, its weight shards, the tied weights safetensors stores once, the
buffers a model built on the meta device lacks, and its tokenizer. Writing folders is moekern.folders'.

Only local folders, only safetensors: nothing is downloaded, nothing unpickled.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from moekern import folders
from moekern.errors import MoekernError

SHIPPED = "shipped"  # the name that selects the small model inside the package
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped" / "model"  # moekern.shipped.MODEL_DIR


def resolve_model_dir(source: str | Path) -> Path:
    """The local folder of a model: `shipped` for the packaged model, else a folder holding config.json."""
    if str(source) == SHIPPED:
        source = SHIPPED_DIR
    path = Path(source).expanduser()
    if not path.exists() and not folders.recover(path):  # recover: a save killed mid-swap left it aside
        raise MoekernError(
            f"model path {str(path)!r} does not exist. Give a local folder with config.json and *.safetensors "
            f"(moekern downloads nothing), or '{SHIPPED}' for the small model that ships with moekern."
        )
    if not path.is_dir():
        raise MoekernError(f"model path {str(path)!r} is a file; give the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise MoekernError(f"{str(path)!r} has no config.json: it is not a Hugging Face model folder")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise MoekernError(f"{str(path / 'config.json')!r} is not valid JSON ({exc}); the checkpoint is corrupt") from exc
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (
            f" It has {', '.join(pickled)}: moekern never unpickles weights; convert them to safetensors first."
            if pickled
            else ""
        )
        raise MoekernError(f"{str(path)!r} holds no *.safetensors weights.{hint}")
    folders.check_shards(path)  # empty, truncated or corrupt shards fail here, whoever reads them next
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Weight shards
# ----------------------------------------------------------------------------------------------------------------------
class Shards:
    """The tensors of a folder's safetensors shards by name, read on demand; which ones were taken."""

    def __init__(self, path: Path):
        self.path, self._open, self.where = path, {}, {}
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise MoekernError(f"{str(index)!r} is not a safetensors index ({exc})") from exc
            missing = sorted({s for s in weight_map.values() if not (path / s).is_file()})
            if missing:
                raise MoekernError(f"weight shard(s) {missing} listed in {index.name} are missing from {str(path)!r}")
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(p.name for p in path.glob("*.safetensors"))
            weight_map = None
        for shard in shards:
            try:
                handle = safe_open(str(path / shard), framework="pt")
                keys = list(handle.keys())
            except Exception as exc:  # safetensors raises SafetensorError, an Exception subclass
                raise MoekernError(f"weight shard {str(path / shard)!r} is corrupt or truncated ({exc})") from exc
            self._open[shard] = handle
            for key in keys:
                self.where.setdefault(key, shard)
        if weight_map is not None:
            absent = sorted(k for k, s in weight_map.items() if self.where.get(k) != s)
            if absent:
                raise MoekernError(
                    f"{index.name} lists {len(absent)} tensor(s) its shards do not hold, e.g. {absent[:3]}; "
                    f"a shard is incomplete or from another checkpoint"
                )
        self.taken: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self):
        return self.where.keys()

    def get(self, key: str, default=None):
        if key not in self.where:
            return default
        self.taken.add(key)
        tensor = self._open[self.where[key]].get_tensor(key)
        if tensor.dtype == getattr(torch, "uint32", None):  # packed nibbles written as unsigned: the same bits
            tensor = tensor.view(torch.int32)
        return tensor

    def read_all(self) -> dict:
        """Every tensor, shard by shard, each shard checked for NaN/inf while it is in the cache."""
        state = {}
        for shard in self._open:
            tensors = {key: self.get(key) for key, where in self.where.items() if where == shard}
            folders.check_finite(tensors.items(), f"weight shard {str(self.path / shard)!r}")
            state.update(tensors)
        return state


def read_weights(path: Path) -> dict:
    """All tensors of a folder's *.safetensors shards, with a clear error for a missing or corrupt shard."""
    return Shards(Path(path)).read_all()


# ----------------------------------------------------------------------------------------------------------------------
# What a model built from its config still needs
# ----------------------------------------------------------------------------------------------------------------------
def fill_tied_weights(model, state: dict) -> None:
    """safetensors stores a tied tensor once, under one of its names: give it to both before loading `state`."""
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        for target, source in (getattr(model, "_tied_weights_keys", None) or {}).items():
            if target in state or source in state:
                state.setdefault(target, state.get(source))
                state.setdefault(source, state[target])


def materialise_buffers(model, config) -> None:
    """Non-persistent buffers built on the meta device (the rotary frequencies) are computed again for real."""
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if "rotary" in type(module).__name__.lower():
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, type(module)(config=getattr(module, "config", config)))
            else:
                raise MoekernError(f"moekern cannot rebuild the buffers of {name} ({type(module).__name__})")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, or None where it has none."""
    if not ((path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def write_weights(tensors: dict, folder: Path, max_shard_bytes: int | None = None) -> None:
    """Write tensors as model.safetensors, or as shards of at most max_shard_bytes with model.safetensors.index.json
    (the names transformers' save_pretrained writes)."""
    from safetensors.torch import save_file

    if max_shard_bytes is None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensors[key]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
