"""Save a built-in model preset as a Hugging Face checkpoint that other engines load.

`python -m semipd_engine.model.export llama-100m OUT_DIR [--seed 0] [--dtype float32|bfloat16]` writes
config.json, model.safetensors (the preset's seeded random weights, the same ones `model=llama-100m` serves) and
the built-in tokenizer (tokenizer.json, its chat template included). The directory then runs here under
`model=hf model.path=OUT_DIR` and under vLLM or transformers unchanged, so two engines can be compared on the
same weights. Heads of 32 and 64 dimensions (`tiny`, `llama-100m`) are sizes vLLM's CPU attention accepts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semipd_engine.config import ModelConfig, freeze

# Head sizes vLLM's CPU attention kernels take (multiples of 32); a checkpoint outside them is refused there on
# its first request, so the export says so up front.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def export(name: str, out: str, seed: int = 0, dtype: str = "float32") -> dict:
    """Write preset `name` to `out`; returns what was written (config, parameter count, head size)."""
    import torch

    from semipd_engine.model import load_weights, resolve
    from semipd_engine.model.loader import DTYPES, save_checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cfg = freeze(ModelConfig, {"name": name, "seed": seed, "dtype": dtype})
    loaded = resolve(cfg)  # unknown presets fail here, naming the known ones
    state = {k: v.to(DTYPES[dtype]) for k, v in load_weights(cfg, loaded.spec).items()}
    hf = loaded.hf_config
    hf.dtype = getattr(torch, dtype)
    save_checkpoint(hf, state, out)
    loaded.tokenizer.save_pretrained(out)
    spec = loaded.spec
    info = {"preset": name, "seed": seed, "dtype": dtype, "path": str(Path(out).resolve()),
            "params": spec.params(), "head_dim": spec.head_dim,
            "vllm_cpu_head_size_ok": spec.head_dim in VLLM_CPU_HEAD_SIZES}
    (Path(out) / "export.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="a built-in model preset (tiny, llama-100m, ...)")
    ap.add_argument("out", help="the directory to write the checkpoint into")
    ap.add_argument("--seed", type=int, default=0, help="model.seed of the weights (default 0, as model=<preset>)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    args = ap.parse_args(argv)
    try:
        info = export(args.preset, args.out, args.seed, args.dtype)
    except ValueError as e:
        print(f"semipd_engine.model.export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(info, indent=2))
    if not info["vllm_cpu_head_size_ok"]:
        print(f"note: head size {info['head_dim']} is not one vLLM's CPU attention accepts "
              f"({', '.join(map(str, VLLM_CPU_HEAD_SIZES))})", file=sys.stderr)


if __name__ == "__main__":
    main()
