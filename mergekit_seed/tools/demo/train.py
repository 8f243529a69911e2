"""Training for the demo: pre-train a tiny LLaMA base, then LoRA, SeRA and full fine-tunes."""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence

import torch
from tqdm import tqdm

from mergekit_seed.output import OutputFolder, staged_path
from mergekit_seed.references.sera_files import load_sera, save_sera
from mergekit_seed.references.sera_layer import SeraConfig, apply_sera, merge_sera
from mergekit_seed.tools.demo.task import CharVocabulary, Example, batch_tensors, pretraining_corpus, save_tokenizer


SEQUENCE_LENGTH = 26  # the longest example (sort or swap of 9 letters) with its end mark


@dataclass(frozen=True)
class BaseConfig:
    """The tiny LLaMA architecture and its pre-training budget."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    pretrain_steps: int = 800
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    skill_share: float = 0.3  # share of the pre-training corpus that is examples of the five skills
    seed: int = 0


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning setting (``lora``, ``sera`` or ``full``)."""

    setting: str
    steps: int
    lr: float
    batch: int = 32
    rank: int = 8
    split: int = 4
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


TRAINING_THREADS = 1


@contextmanager
def deterministic_training() -> Iterator[None]:
    """Train on one thread with torch's deterministic algorithms: the same seed gives the same
    weights run after run, whatever the machine's core count (the thread count decides how
    reductions are split). Kernels still differ between CPU instruction sets (AVX2, AVX-512);
    docs/demo.md gives how far the numbers move between them, measured."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(TRAINING_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def corpus_size(config: BaseConfig) -> int:
    return config.pretrain_steps * config.pretrain_batch // 4


def pretraining_prompts(config: BaseConfig) -> set:
    """The ``op:input=`` prompts the base saw, kept out of the held-out evaluation."""
    lines = pretraining_corpus(corpus_size(config), config.seed, config.skill_share)
    return {line[: line.index("=") + 1] for line in lines if "=" in line}


def build_base(path: Path, config: BaseConfig, vocabulary: CharVocabulary, quiet: bool = False) -> Path:
    """Pre-train the base on the synthetic corpus and publish it as ``path`` (weights, config,
    tokenizer; :class:`~mergekit_seed.output.OutputFolder`). A run building the same ``path``
    meanwhile is waited for, and what it built is kept."""
    with OutputFolder(path, command="demo-base", report=True, wait=True) as output:
        if not (Path(path) / "model.safetensors").is_file():
            save_checkpoint(pretrain(config, vocabulary, quiet), output.staging, vocabulary)
            output.publish()
    return Path(path)


def save_checkpoint(model, folder: Path, vocabulary: CharVocabulary) -> None:
    """A full checkpoint (safetensors) and the character tokenizer in ``folder``, inside an output folder's staging."""
    model.save_pretrained(staged_path(folder), safe_serialization=True)
    save_tokenizer(folder, vocabulary)


def pretrain(config: BaseConfig, vocabulary: CharVocabulary, quiet: bool = False):
    """The base model, pre-trained on the synthetic corpus."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocabulary),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_attention_heads,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            pad_token_id=vocabulary.pad_id,
            eos_token_id=vocabulary.end_id,
            bos_token_id=vocabulary.end_id,
        )
    )
    corpus = pretraining_corpus(corpus_size(config), config.seed, config.skill_share)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.pretrain_lr, total_steps=config.pretrain_steps)
    rng = random.Random(config.seed)
    model.train()
    with deterministic_training():
        for _ in tqdm(range(config.pretrain_steps), desc="Pre-training the base", disable=quiet):
            ids, labels = batch_tensors(rng.sample(corpus, config.pretrain_batch), vocabulary, SEQUENCE_LENGTH)
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model


def finetune(
    base: Path,
    out: Path,
    train: Sequence[Example],
    config: FinetuneConfig,
    seed: int,
    vocabulary: CharVocabulary,
    quiet: bool = False,
) -> Path:
    """Fine-tune ``base`` on ``train``; ``seed`` sets the adapter init and the data order.

    Publishes a PEFT LoRA adapter, a SeRA adapter or a full checkpoint as ``out``
    (:class:`~mergekit_seed.output.OutputFolder`).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    if config.setting == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=config.rank, lora_alpha=2 * config.rank, target_modules=list(config.targets), lora_dropout=0.0
            ),
        )
    elif config.setting == "sera":
        sera_config = SeraConfig(
            r=config.rank,
            split=config.split,
            sera_alpha=2 * config.rank,
            target_modules=list(config.targets),
            base_model_name_or_path=str(base),
        )
        apply_sera(model, sera_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps)
    order = random.Random(seed)
    model.train()
    with deterministic_training():
        for _ in tqdm(range(config.steps), desc=f"Fine-tuning {config.setting} seed {seed}", disable=quiet):
            batch = order.sample(list(train), config.batch)
            ids, labels = batch_tensors(
                [e.text for e in batch], vocabulary, SEQUENCE_LENGTH, [len(e.prompt) for e in batch]
            )
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    if config.setting == "sera":
        save_sera(model, out, sera_config)
        return out
    with OutputFolder(out, command="demo-finetune") as output:
        if config.setting == "lora":
            model.save_pretrained(staged_path(output.staging))
        else:
            save_checkpoint(model, output.staging, vocabulary)
        output.publish()
    return out


def load_for_eval(base: Path, merged: Path, kind: str):
    """A model to evaluate: a full checkpoint, base + PEFT LoRA adapter, or base + SeRA adapter."""
    from transformers import AutoModelForCausalLM

    if kind == "full":
        return AutoModelForCausalLM.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(base)
    if kind == "sera":
        return merge_sera(load_sera(model, merged))
    from peft import PeftModel

    return PeftModel.from_pretrained(model, merged).merge_and_unload()


def seed_names(count: int) -> List[str]:
    return [f"seed{i}" for i in range(count)]
