"""Llama-family model over a paged KV cache: spec, loader, forward, attention."""

from __future__ import annotations

from dataclasses import dataclass

from semipd_engine.model.spec import ModelSpec


@dataclass
class LoadedModel:
    spec: ModelSpec
    hf_config: object
    tokenizer: object


def resolve(model_cfg) -> LoadedModel:
    """Spec, HF config and tokenizer for a model config, without loading weights."""
    from semipd_engine.model.loader import load_hf_config
    from semipd_engine.model.presets import preset_hf_config
    from semipd_engine.serving.tokenizer import load_tokenizer

    if model_cfg.path:
        hf = load_hf_config(model_cfg.path)
        tok_dir = model_cfg.tokenizer or (model_cfg.path if _has_tokenizer(model_cfg.path) else None)
        tok = load_tokenizer(tok_dir)
    else:
        tok = load_tokenizer(model_cfg.tokenizer)
        hf = preset_hf_config(model_cfg.name, len(tok), tok.bos_token_id, tok.eos_token_id)
    return LoadedModel(ModelSpec.from_hf_config(hf), hf, tok)


def load_weights(model_cfg, spec: ModelSpec):
    """The HF-named state dict: from safetensors, or seeded random for a preset."""
    from semipd_engine.model.loader import random_state_dict, read_safetensors

    if model_cfg.path:
        return read_safetensors(model_cfg.path)
    return random_state_dict(spec, model_cfg.seed)


def _has_tokenizer(path: str) -> bool:
    from pathlib import Path

    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
