"""`mergekit-seed compare`: scores equal a direct transformers computation; adapters score as
their materialised models; verdicts follow the interval."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import drawn, refused, run_cli, save_random_lora

from mergekit_seed.tools.compare import load_model, read_data, score_rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


TEXTS = [
    {"text": t} for t in ("rev:abc=cba", "sort:dcb=bcd", "add:12+30=42", "next:abc=bcd", "dup:ab=aabb", "rev:xyz=zyx")
]
ANSWERS = [
    {"prompt": "rev:abc=", "answer": "cba"},
    {"prompt": "add:1+2=", "answer": "3"},
    {"prompt": "dup:xy=", "answer": "xxyy"},
]


def test_perplexity_and_answer_logprob_equal_transformers_losses(tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed = tiny_family[1][0]
    model, tokenizer = load_model(str(seed), None, "cpu")
    reference = AutoModelForCausalLM.from_pretrained(seed).eval()
    tokens = AutoTokenizer.from_pretrained(seed)
    _, rows = read_data_rows(TEXTS)
    for (total, count), row in zip(score_rows(model, tokenizer, rows, "perplexity", batch_size=4), rows):
        ids = torch.tensor([tokens(row.text)["input_ids"]])
        loss = reference(input_ids=ids, labels=ids).loss  # mean NLL of tokens 1..n
        assert count == ids.shape[1] - 1
        assert total / count == pytest.approx(-loss.item(), abs=1e-5)
    _, rows = read_data_rows(ANSWERS)
    for (logprob, count), row in zip(score_rows(model, tokenizer, rows, "answer_logprob"), rows):
        prompt = tokens(row.prompt)["input_ids"]
        answer = tokens(row.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        loss = reference(input_ids=ids, labels=labels).loss  # mean NLL of the answer tokens
        assert count == len(answer)
        assert logprob == pytest.approx(-loss.item() * len(answer), abs=1e-4)


def read_data_rows(rows):
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        return read_data(write_jsonl(Path(scratch) / "d.jsonl", rows))


def test_an_adapter_scores_as_its_materialised_model(tiny_family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_family[0]
    adapter = save_random_lora(base, tmp_path / "lora", r=4, seed=5)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "full")
    shutil.copy(base / "tokenizer.json", tmp_path / "full")
    shutil.copy(base / "tokenizer_config.json", tmp_path / "full")
    _, rows = read_data_rows(TEXTS)
    a = score_rows(*load_model(str(adapter), str(base), "cpu"), rows, "perplexity")
    b = score_rows(*load_model(str(tmp_path / "full"), None, "cpu"), rows, "perplexity")
    for (x, n), (y, m) in zip(a, b):
        assert n == m and x == pytest.approx(y, abs=1e-4)


def test_better_on_every_example_and_identical_models(tiny_family, tmp_path):
    from tiny import save_tiny_llama

    seeds = tiny_family[1]
    good, other = str(seeds[0]), str(save_tiny_llama(tmp_path / "other", seed=99))
    # answers are what `good` generates greedily; keep the prompts where `other` generates something else
    model, tokenizer = load_model(good, None, "cpu")
    prompts = [
        f"{op}:{w}="
        for op in ("rev", "sort", "dup", "next", "add")
        for w in ("abc", "xyz", "mno", "pq", "hij", "uvw", "12", "7")
    ]
    rows = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        for _ in range(3):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        answer = tokenizer.decode(ids[0, -3:].tolist(), skip_special_tokens=True)
        if answer.strip() and len(tokenizer(answer, add_special_tokens=False)["input_ids"]) == 3:
            rows.append({"prompt": prompt, "answer": answer})
    other_model, _ = load_model(other, None, "cpu")
    _, parsed = read_data_rows(rows)
    hits = score_rows(other_model, tokenizer, parsed, "prefix_match")
    rows = [row for row, (hit, _) in zip(rows, hits) if hit == 0]
    assert len(rows) >= 5
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    twin = shutil.copytree(seeds[0], tmp_path / "twin")

    result = run_cli(
        "mergekit-seed",
        "compare",
        good,
        other,
        twin,
        "--data",
        data,
        "--out",
        tmp_path / "out",
        "--metric",
        "prefix_match",
        "--reference",
        other,
        "--quiet",
        "--resamples",
        "2000",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    # published reports name local models by their folders, never by the merging machine's paths
    better = report["versus_reference"]["seed0"]
    assert (better["mean"], better["low"], better["high"], better["verdict"]) == (1.0, 1.0, 1.0, "better")
    assert report["models"]["seed0"]["score"] == 1.0 and report["models"]["other"]["score"] == 0.0
    assert (tmp_path / "out" / "compare.png").stat().st_size > 5_000
    assert "| model |" in result.stdout and "better" in result.stdout

    run_cli("mergekit-seed", "compare", good, twin, "--data", data, "--out", tmp_path / "same", "--quiet", check=True)
    same = json.loads((tmp_path / "same" / "compare.json").read_text())
    difference = next(iter(same["versus_reference"].values()))
    assert (difference["mean"], difference["low"], difference["high"]) == (0.0, 0.0, 0.0)
    assert difference["verdict"] == "no detectable difference"

    # deterministic bootstrap for a fixed seed
    run_cli(
        "mergekit-seed",
        "compare",
        good,
        other,
        "--data",
        data,
        "--out",
        tmp_path / "a",
        "--quiet",
        "--seed",
        "4",
        check=True,
    )
    run_cli(
        "mergekit-seed",
        "compare",
        good,
        other,
        "--data",
        data,
        "--out",
        tmp_path / "b",
        "--quiet",
        "--seed",
        "4",
        check=True,
    )
    assert (tmp_path / "a" / "compare.json").read_text() == (tmp_path / "b" / "compare.json").read_text()


def test_the_reference_defaults_to_the_best_model_that_is_not_a_merge(tiny_family, tmp_path):
    from conftest import write_recipe

    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "seedlora_dm", base, seeds)
    run_cli("mergekit-seed", "run", recipe, tmp_path / "merged", "--quiet", check=True)
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    models = [str(s) for s in seeds] + [str(tmp_path / "merged")]
    run_cli("mergekit-seed", "compare", *models, "--data", data, "--out", tmp_path / "out", "--quiet", check=True)
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert report["models"]["merged"]["merge"] is True
    seeds_only = {name: entry["score"] for name, entry in report["models"].items() if not entry["merge"]}
    assert report["reference"] == min(seeds_only, key=seeds_only.get)  # perplexity: lower is better


@pytest.mark.parametrize(
    "content,fragment",
    [
        ('{"text": "a"}\n{"prompt": "x"}\n', "d.jsonl:2: needs"),
        ("", "d.jsonl: no examples"),
        ('{"text": "a"}\nnot json\n', "d.jsonl:2: not a JSON line"),
        ('{"text": "a"}\n{"prompt": "p", "answer": "a"}\n', "d.jsonl:2: mixes"),
    ],
)
def test_bad_data_is_one_line(tiny_family, tmp_path, content, fragment):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    seeds = tiny_family[1]
    refused(
        run_cli("mergekit-seed", "compare", seeds[0], seeds[1], "--data", data, "--out", tmp_path / "out"), fragment
    )
    assert not (tmp_path / "out").exists()


def _spaced_tokenizer(folder: Path):
    """A character-level WordLevel tokenizer with no decoder: decode joins tokens with spaces."""
    from tiny import TINY_VOCABULARY
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(dict(TINY_VOCABULARY.index), unk_token="#"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="#", pad_token="#")
    tokenizer.save_pretrained(folder)
    return tokenizer


def _byte_level_bpe(folder: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    backend = ByteLevelBPETokenizer()
    corpus = [
        f"{op}:{w}={w[::-1]} and more words"
        for op in ("rev", "sort", "dup")
        for w in ("abc", "xyz", "mno", "hello", "world")
    ]
    backend.train_from_iterator(corpus, vocab_size=300, min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.mark.parametrize("kind", ["decode inserts spaces", "byte-level BPE"])
def test_prefix_match_scores_a_model_that_answers_right_at_100_percent(tmp_path, kind):
    """The answer is the text of the tokens the model generates first (prefix_match, the rule
    exact_match had before issue 49); decode joins a character vocabulary's tokens with spaces,
    which must not turn every hit into a miss."""
    from tiny import TINY_LLAMA
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "model"
    tokenizer = _spaced_tokenizer(folder) if kind == "decode inserts spaces" else _byte_level_bpe(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY_LLAMA, vocab_size=len(tokenizer)))).eval()
    model.save_pretrained(folder)
    rows = []
    for prompt in [
        f"{op}:{w}=" for op in ("rev", "sort", "dup") for w in ("abc", "xyz", "mno", "hello", "world", "pq")
    ]:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            for _ in range(3):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        generated = ids[0, -3:].tolist()
        if kind == "decode inserts spaces":
            answer = "".join(tokenizer.convert_ids_to_tokens(generated))  # the characters themselves
        else:
            answer = tokenizer.decode(generated)
        if (
            answer.strip() == answer
            and answer
            and tokenizer(answer, add_special_tokens=False)["input_ids"] == generated
        ):
            rows.append({"prompt": prompt, "answer": answer})
    assert len(rows) >= 5
    if kind == "decode inserts spaces":
        assert " " in tokenizer.decode(tokenizer(rows[0]["answer"], add_special_tokens=False)["input_ids"])
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    twin = shutil.copytree(folder, tmp_path / "twin")
    run_cli(
        "mergekit-seed",
        "compare",
        folder,
        twin,
        "--data",
        data,
        "--metric",
        "prefix_match",
        "--out",
        tmp_path / "out",
        "--quiet",
        check=True,
    )
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert report["models"][folder.name]["score"] == 1.0


def test_a_model_without_tokenizer_is_refused_and_tokenizer_names_one(tiny_family, tmp_path):
    base, seeds = tiny_family
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(seeds[0] / name, bare)
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    refused(
        run_cli("mergekit-seed", "compare", bare, seeds[1], "--data", data, "--out", tmp_path / "out"),
        f"{bare}: no tokenizer files",
        "--tokenizer",
    )
    run_cli(
        "mergekit-seed",
        "compare",
        bare,
        seeds[0],
        "--data",
        data,
        "--tokenizer",
        base,
        "--out",
        tmp_path / "out",
        "--quiet",
        check=True,
    )
    same = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert next(iter(same["versus_reference"].values()))["mean"] == 0.0  # same weights, same tokenizer


def test_a_model_given_twice_is_said_and_cuda_without_a_gpu_names_scoring(tiny_family, tmp_path):
    seeds = tiny_family[1]
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    result = run_cli(
        "mergekit-seed",
        "compare",
        seeds[0],
        seeds[1],
        seeds[0],
        "--data",
        data,
        "--out",
        tmp_path / "out",
        "--quiet",
        check=True,
    )
    assert f"{seeds[0]} is given twice" in result.stdout
    assert len(json.loads((tmp_path / "out" / "compare.json").read_text())["models"]) == 2
    if not torch.cuda.is_available():
        refused(
            run_cli("mergekit-seed", "compare", seeds[0], seeds[1], "--data", data, "--out", tmp_path / "c", "--cuda"),
            "--cuda",
            "score on the CPU",
        )


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_an_example_longer_than_the_context_is_one_line(tiny_family, tmp_path, architecture):
    """A 300-character row on a 64-position model: LLaMA scored it silently past its context,
    GPT-2 raised IndexError."""
    from transformers import GPT2Config, GPT2LMHeadModel

    seeds = tiny_family[1]
    models = [seeds[0], seeds[1]]
    if architecture == "gpt2":
        models = []
        for index in range(2):
            torch.manual_seed(index)
            folder = tmp_path / f"gpt2-{index}"
            GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64)).save_pretrained(
                folder
            )
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(seeds[0] / name, folder)
            models.append(folder)
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:2] + [{"text": "rev:" + "abc" * 100}])
    refused(
        run_cli("mergekit-seed", "compare", *models, "--data", data, "--out", tmp_path / "out", "--quiet"),
        "example 3:",
        "more than the model's context of 64",
    )


def test_greedy_continuation_is_the_argmax_whatever_the_model_generation_config(tiny_family):
    """exact_match decodes through transformers' generate (KV cache); it must equal an argmax
    loop over full forward passes, and ignore an end-of-sequence token the model would emit,
    a repetition penalty and suppressed tokens from the model's generation config."""
    from transformers import AutoModelForCausalLM

    from mergekit_seed.tools.compare import greedy_continuation

    model = AutoModelForCausalLM.from_pretrained(tiny_family[0]).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    expected = ids
    with torch.no_grad():
        for _ in range(9):
            expected = torch.cat([expected, model(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    own = model.generation_config
    own.eos_token_id = int(expected[0, 7])  # a token the argmax emits mid-answer
    own.repetition_penalty = 1.5
    own.suppress_tokens = [int(expected[1, 6])]
    with torch.no_grad():
        decoded = greedy_continuation(model, ids, 9)
    assert torch.equal(decoded, expected)
    assert model.generation_config is own and own.repetition_penalty == 1.5


GROUPED = [
    {"prompt": f"{op}:{word}=", "answer": answer, "skill": op}
    for op, pairs in {
        "rev": [("abc", "cba"), ("xyz", "zyx"), ("mno", "onm")],
        "dup": [("ab", "aabb"), ("xy", "xxyy"), ("pq", "ppqq")],
        "next": [("abc", "bcd"), ("klm", "lmn")],
    }.items()
    for word, answer in pairs
]


def _answer_logprobs(folder: Path, rows) -> list:
    """log p(answer | prompt) per row from transformers' own loss: the independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokens = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    values = []
    for row in rows:
        prompt = tokens(row["prompt"])["input_ids"]
        answer = tokens(row["answer"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            loss = model(
                input_ids=torch.tensor([prompt + answer]), labels=torch.tensor([[-100] * len(prompt) + answer])
            )
        values.append(-loss.loss.item() * len(answer))
    return values


def test_groups_compare_every_model_per_group_with_the_oracle(tiny_family, tmp_path, monkeypatch):
    """Issue 49: compare reported one pooled number. Rows carrying a group (--group-by names the
    field) are also compared per group, with paired intervals, and the oracle (the best seed on
    each group) is what merging could win; compare.json, compare.md and compare.png carry them."""
    from mergekit_seed.tools.compare import compare

    titles = drawn(monkeypatch, "set_title", 0)
    seeds = tiny_family[1]
    data = write_jsonl(tmp_path / "d.jsonl", GROUPED)
    models = [str(seed) for seed in seeds]
    report = compare(
        models,
        data,
        tmp_path / "out",
        metric="answer_logprob",
        group_by="skill",
        resamples=500,
        quiet=True,
        echo=lambda _line: None,
    )
    expected = {model: _answer_logprobs(Path(model), GROUPED) for model in models}
    groups = {op: [i for i, row in enumerate(GROUPED) if row["skill"] == op] for op in ("rev", "dup", "next")}
    assert list(report["groups"]) == list(groups)
    reference = report["reference"]
    for group, indices in groups.items():
        entry = report["groups"][group]
        assert entry["examples"] == len(indices)
        for model in models:
            mean = sum(expected[model][i] for i in indices) / len(indices)
            assert entry["scores"][model] == pytest.approx(mean, abs=1e-4)
            if model != reference:
                difference = sum(expected[model][i] - expected[reference][i] for i in indices) / len(indices)
                versus = entry["versus_reference"][model]
                assert versus["mean"] == pytest.approx(difference, abs=1e-4) and versus["low"] <= versus["high"]
    picks = {g: max(models, key=lambda m, i=i: sum(expected[m][k] for k in i)) for g, i in groups.items()}
    assert report["oracle"]["best_seed_per_group"] == picks
    oracle = sum(expected[picks[row["skill"]]][i] for i, row in enumerate(GROUPED)) / len(GROUPED)
    assert report["oracle"]["score"] == pytest.approx(oracle, abs=1e-4)
    assert report["oracle"]["score"] >= max(report["models"][m]["score"] for m in models) - 1e-9
    table = (tmp_path / "out" / "compare.md").read_text()
    assert all(f"Group {group} ({len(indices)} examples)" in table for group, indices in groups.items())
    assert "Oracle (the best seed on each group" in table
    assert [t for t in titles if "examples" in t][1:] == [f"{g}: {len(i)} examples" for g, i in groups.items()]


def test_a_named_group_field_must_be_on_every_row(tiny_family, tmp_path):
    seeds = tiny_family[1]
    data = write_jsonl(tmp_path / "d.jsonl", [*GROUPED[:2], {"prompt": "rev:q=", "answer": "q"}])
    refused(
        run_cli(
            "mergekit-seed", "compare", *seeds[:2], "--data", data, "--group-by", "skill", "--out", tmp_path / "o"
        ),
        "d.jsonl:3",
        "skill",
    )
