"""Write the random-weight Mixtral-shaped folder that moekern and llama.cpp are timed on side by side: 1 decoder layer,
hidden 4096, 8 experts of 14336 (top-2), vocab 4096 (the shipped model's byte-level BPE tokenizer), bf16 safetensors.

    python benchmarks/peer_model.py /tmp/mixtral-1l
    ../shared/tools/llamacpp-peer /tmp/mixtral-1l 2 128        # llama.cpp Q4_0, BF16, F32 on 2 threads
    python -m moekern.cli bench /tmp/mixtral-1l --recipe rtn4 --context 128 --batch-sizes 1 --device cpu

The weights are the mixtral-8x7b preset's initialisation (moekern.bench.presets, seed 0) on the smaller vocabulary.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekern.bench.presets import preset_config, _randomise  # noqa: E402
from moekern.shipped import MODEL_DIR  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=1)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    config = preset_config("mixtral-8x7b", args.layers)
    config.vocab_size = 4096
    config.bos_token_id, config.eos_token_id = 0, 1
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    _randomise(model, torch.Generator().manual_seed(0))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (Path(MODEL_DIR) / name).exists():
            shutil.copy(Path(MODEL_DIR) / name, args.out / name)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
