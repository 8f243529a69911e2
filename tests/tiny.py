"""Tiny LLaMA checkpoints generated locally (no Hub access): test fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from safetensors.torch import save_file

from mergekit_seed.references.weights import load_weights
from mergekit_seed.tools.demo.task import ALPHABET, CharVocabulary, char_tokenizer


TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
# the demo's characters, padded with other printable ones to the tiny vocabulary size
TINY_VOCABULARY = CharVocabulary(
    ALPHABET
    + "".join(c for c in map(chr, range(33, 127)) if c not in ALPHABET)[: TINY_LLAMA["vocab_size"] - len(ALPHABET)]
)


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny LlamaForCausalLM saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(path, safe_serialization=True)
    char_tokenizer(TINY_VOCABULARY).save_pretrained(str(path))
    return path


def derive_seeds(base: Path, out_dir: Path, count: int, scale: float = 0.02) -> List[Path]:
    """Seed checkpoints = base + shared low-rank update + seed-specific noise."""
    weights = load_weights(base)
    generator = torch.Generator().manual_seed(1234)
    shared = {name: scale * torch.randn(t.shape, generator=generator) for name, t in weights.items()}
    paths = []
    for index in range(count):
        seed_weights = {
            name: (t + shared[name] + 0.5 * scale * torch.randn(t.shape, generator=generator)).to(t.dtype).contiguous()
            for name, t in weights.items()
        }
        seed_dir = out_dir / f"seed{index}"
        seed_dir.mkdir(parents=True)
        for file in base.iterdir():
            if file.suffix != ".safetensors":
                (seed_dir / file.name).write_bytes(file.read_bytes())
        save_file(seed_weights, seed_dir / "model.safetensors", metadata={"format": "pt"})
        paths.append(seed_dir)
    return paths
