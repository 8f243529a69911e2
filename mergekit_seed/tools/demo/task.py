"""The demo's synthetic task: string and arithmetic transformations written ``op:input=output``.

Five sub-skills share one character vocabulary; a model is asked ``op:input=`` and must
produce ``output`` followed by a newline. Accuracy is exact match, per sub-skill, under
greedy decoding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mergekit_seed.output import staged_path


LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
PAD, END = "_", "\n"
ALPHABET = PAD + END + LETTERS + DIGITS + ":=+"


class CharVocabulary:
    """Character <-> id, matching the saved tokenizer (see :func:`char_tokenizer`)."""

    def __init__(self, alphabet: str = ALPHABET):
        self.alphabet = alphabet
        self.index = {c: i for i, c in enumerate(alphabet)}
        self.pad_id = self.index[PAD]
        self.end_id = self.index[END]

    def __len__(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> List[int]:
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


def char_tokenizer(vocabulary: CharVocabulary):
    """A character-level fast tokenizer over the vocabulary (transformers' ``PreTrainedTokenizerFast``)."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(dict(vocabulary.index), unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters decode back to the text, without spaces between them
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=PAD, pad_token=PAD, eos_token=END)


def save_tokenizer(path, vocabulary: CharVocabulary) -> None:
    """:func:`char_tokenizer` saved in ``path`` (inside an output folder's staging), so merges carry a tokenizer."""
    char_tokenizer(vocabulary).save_pretrained(str(staged_path(path)))


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _add(rng: random.Random) -> Tuple[str, str]:
    """A number below 10,000 plus 1 to 3: mostly a copy, with carries to get right."""
    a, b = rng.randint(0, 9999), rng.randint(1, 3)
    return f"{a}+{b}", str(a + b)


def _climb(word: str) -> str:
    """Each letter shifted by its position (1 for the first): abc -> bdf."""
    return "".join(LETTERS[(LETTERS.index(c) + i + 1) % 26] for i, c in enumerate(word))


def _swap(word: str) -> str:
    """Adjacent letters swapped pairwise: abcde -> badce."""
    letters = list(word)
    for i in range(0, len(letters) - 1, 2):
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
    return "".join(letters)


SKILLS: Dict[str, Callable[[random.Random], Tuple[str, str]]] = {
    "rev": lambda rng: (lambda w: (w, w[::-1]))(_word(rng, 3, 9)),
    "sort": lambda rng: (lambda w: (w, "".join(sorted(w))))(_word(rng, 3, 9)),
    "climb": lambda rng: (lambda w: (w, _climb(w)))(_word(rng, 2, 5)),
    "swap": lambda rng: (lambda w: (w, _swap(w)))(_word(rng, 3, 9)),
    "add": _add,
}
"""Each sub-skill draws (input, output) from a random generator. Inputs of several lengths make
each skill graded: a small model gets the short ones right before the long ones, so fine-tunes
land between "cannot" and "always" and different seeds get different examples right."""


@dataclass(frozen=True)
class Example:
    skill: str
    prompt: str  # "op:input="
    answer: str  # "output\n"

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def make_examples(count_per_skill: int, seed: int, exclude: frozenset = frozenset()) -> List[Example]:
    """``count_per_skill`` distinct examples of every skill, none of whose prompts is in ``exclude``."""
    rng = random.Random(seed)
    examples: List[Example] = []
    for skill, draw in SKILLS.items():
        seen = set(exclude)
        produced = 0
        while produced < count_per_skill:
            source, target = draw(rng)
            prompt = f"{skill}:{source}="
            if prompt in seen:
                continue
            seen.add(prompt)
            examples.append(Example(skill, prompt, target + END))
            produced += 1
    return examples


def pretraining_corpus(count: int, seed: int, skill_share: float = 0.3) -> List[str]:
    """Text for the base model: copies (``cpy:abc=abc``), bare words and numbers, and a share
    of the five sub-skills, so the base is a weak but real starting point that fine-tuning
    sharpens (as with a pre-trained LLM)."""
    rng = random.Random(seed)
    skills = list(SKILLS.items())
    lines = []
    for _ in range(count):
        if rng.random() < skill_share:
            skill, draw = rng.choice(skills)
            source, target = draw(rng)
            lines.append(f"{skill}:{source}={target}{END}")
            continue
        kind = rng.random()
        if kind < 0.6:
            word = _word(rng, 2, 7)
            lines.append(f"cpy:{word}={word}{END}")
        elif kind < 0.8:
            number = str(rng.randint(0, 999))
            lines.append(f"cpy:{number}={number}{END}")
        else:
            lines.append(_word(rng, 3, 10) + END)
    return lines


def batch_tensors(
    texts: Sequence[str], vocabulary: CharVocabulary, length: int, answer_starts: Sequence[int] | None = None
):
    """(input_ids, labels) padded to ``length``; labels are -100 on padding and, when
    ``answer_starts`` is given, on the prompt (the loss is on the answer only)."""
    ids = torch.full((len(texts), length), vocabulary.pad_id, dtype=torch.long)
    labels = torch.full((len(texts), length), -100, dtype=torch.long)
    for row, text in enumerate(texts):
        encoded = vocabulary.encode(text)[:length]
        ids[row, : len(encoded)] = torch.tensor(encoded)
        start = answer_starts[row] if answer_starts is not None else 0
        labels[row, start : len(encoded)] = torch.tensor(encoded[start:])
    return ids, labels


@torch.no_grad()
def exact_matches(
    model, examples: Sequence[Example], vocabulary: CharVocabulary, max_new_tokens: int = 12
) -> List[bool]:
    """Per example (in order): whether greedy decoding gives exactly the answer."""
    model.eval()
    by_length: Dict[int, List[int]] = {}
    for index, example in enumerate(examples):
        by_length.setdefault(len(example.prompt), []).append(index)
    correct = [False] * len(examples)
    for indices in by_length.values():
        ids = torch.tensor([vocabulary.encode(examples[i].prompt) for i in indices])
        generated = torch.empty((len(indices), 0), dtype=torch.long)
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.cat([ids, generated], dim=1)).logits[:, -1]
            next_ids = logits.argmax(-1, keepdim=True)
            generated = torch.cat([generated, next_ids], dim=1)
            if (generated == vocabulary.end_id).any(dim=1).all():
                break
        for index, row in zip(indices, generated.tolist()):
            text = vocabulary.decode(row)
            answer = text[: text.index(END) + 1] if END in text else text
            correct[index] = answer == examples[index].answer
    return correct


def accuracy_by_skill(examples: Sequence[Example], correct: Sequence[bool]) -> Dict[str, float]:
    """Exact-match accuracy per skill (and ``"all"``) from per-example results."""
    result = {}
    for skill in SKILLS:
        hits = [c for e, c in zip(examples, correct) if e.skill == skill]
        if hits:
            result[skill] = sum(hits) / len(hits)
    result["all"] = sum(correct) / max(1, len(correct))
    return result
