"""The embedded demo (quick mode) and the analyze command."""

import json
import math

import pytest
import torch
from conftest import drawn, run_cli

from mergekit_seed.references.weights import load_weights
from mergekit_seed.tools.analysis import subspace_similarity
from mergekit_seed.tools.demo.pipeline import MERGEKIT_METHODS, SETTINGS, ours


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("demo")
    os.environ["MERGEKIT_SEED_CACHE"] = str(root / "cache")
    started_in = os.getcwd()
    os.chdir(root)  # --out typed as a relative folder, as the README's `make demo` does
    try:
        result = run_cli("mergekit-seed", "demo", "--quick", "--quiet", "--out", "out")
    finally:
        os.chdir(started_in)
    assert result.returncode == 0, result.stderr
    return root / "out", result.stdout


def test_quick_demo_writes_results_in_the_papers_layout(quick_demo):
    out, stdout = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert set(results["settings"]) == set(SETTINGS)
    for entry in results["settings"].values():
        assert set(entry["seeds"]) == {"seed0", "seed1", "seed2"}
        assert set(entry["methods"]) == set(ours()) | set(MERGEKIT_METHODS)
        for value in list(entry["seeds"].values()) + list(entry["methods"].values()):
            assert 0.0 <= value <= 1.0
        assert set(entry["per_skill"]["seedft"]) == set(results["task"]["skills"])
        # seeds actually learned something beyond nothing
        assert max(entry["seeds"].values()) > 0.2
    assert results["config"]["quick"] is True and results["config"]["threads"] == 1
    environment = results["environment"]
    assert set(environment["versions"]) >= {"torch", "transformers", "peft", "mergekit", "mergekit-seed"}
    assert all(version != "unknown" for version in environment["versions"].values())
    assert environment["threads"] == 1 and environment["device"] == "cpu"
    assert environment["cpu"] and environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for entry in results["settings"].values():
        for reference in ("versus_best_seed", "versus_mean_seed"):
            for method, difference in entry[reference].items():
                assert difference["low"] <= difference["mean"] <= difference["high"], method
                assert difference["verdict"] in ("better", "worse", "no detectable difference")
        # the oracle bounds every seed; the mean seed lies between the worst and the best seed
        assert entry["oracle"] >= max(entry["seeds"].values()) - 1e-12
        assert min(entry["seeds"].values()) - 1e-12 <= entry["mean_seed"] <= max(entry["seeds"].values()) + 1e-12
        assert 0 <= entry["disagreement"] <= entry["oracle"]
        regime = entry["regime_on_validation"]
        assert set(regime["mean_seed_per_skill"]) == set(results["task"]["skills"])
        assert set(regime["criteria"]) == {"every_skill_between_20_and_90", "disagreement_at_least_10"}
        assert entry["best_of_ours_by_validation"] in ours()
    assert (out / "results.png").stat().st_size > 10_000
    assert "| setting | seed0 |" in stdout and "best seed" in stdout and "oracle" in stdout
    assert "experiment 1/1" in stdout and "| best seed, lora |" in stdout and "| mean seed, full |" in stdout
    assert f"torch CPU capability: {environment['cpu_capability']}" in stdout and "not comparable" in stdout
    # the demo's recipes are real recipes with model cards
    assert (out / "merges" / "lora" / "seedlora_twostage" / "adapter_config.json").exists()
    assert "## Reproduce" in (out / "merges" / "full" / "seedft" / "README.md").read_text()
    # compare's table names the models as the user's --out names them, not by absolute paths
    table = (out / "compare" / "compare.md").read_text()
    assert (
        "| out/models/full/seed0 |" in table
        and str(out) not in table
        and "examples of out/compare-data.jsonl" in table
    )


def test_demo_merges_and_evaluation_are_deterministic(quick_demo):
    out, _ = quick_demo
    first = json.loads((out / "results.json").read_text())["settings"]
    before = load_weights(out / "merges" / "full" / "seedlora_twostage")
    result = run_cli("mergekit-seed", "demo", "--quick", "--quiet", "--out", out)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "results.json").read_text())["settings"] == first
    after = load_weights(out / "merges" / "full" / "seedlora_twostage")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_splits_are_disjoint_and_the_best_seed_is_chosen_on_validation():
    from mergekit_seed.tools.demo.pipeline import DemoConfig, experiment_data, summarise
    from mergekit_seed.tools.demo.task import SKILLS
    from mergekit_seed.tools.demo.train import pretraining_prompts

    config = DemoConfig.for_mode(quick=True)
    train, validation, test = experiment_data(config, 0)
    prompts = [{e.prompt for e in split} for split in (train, validation, test)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert not ((prompts[1] | prompts[2]) & pretraining_prompts(config.base))
    # seed1 is best on validation, seed2 on test: the verdict must use seed1's test answers
    n = len(test)

    def model(validation_hits, test_hits):
        return {
            "validation": {"all": validation_hits / n, "correct": [1] * validation_hits + [0] * (n - validation_hits)},
            "test": {"all": test_hits / n, "correct": [1] * test_hits + [0] * (n - test_hits)},
        }

    setting = {
        "seed0": model(10, 10),
        "seed1": model(30, 20),
        "seed2": model(20, 40),
        **{m: model(25, 25) for m in ours() + MERGEKIT_METHODS},
    }
    for split in ("validation", "test"):
        for entry in setting.values():
            entry[split].update(dict.fromkeys(SKILLS, entry[split]["all"]))
    results = summarise([{"lora": setting, "sera": setting, "full": setting}], config)
    entry = results["settings"]["lora"]
    assert entry["best_seed_by_validation"] == ["seed1"]
    assert entry["versus_best_seed"]["seedft"]["mean"] == pytest.approx((25 - 20) / n)
    assert entry["versus_mean_seed"]["seedft"]["mean"] == pytest.approx((25 - (10 + 20 + 40) / 3) / n)
    assert entry["oracle"] == pytest.approx(40 / n) and entry["disagreement"] == pytest.approx(30 / n)


def test_every_example_fits_the_training_window():
    """No answer is cut before its end-of-answer mark (the model would never learn to stop)."""
    from mergekit_seed.tools.demo.task import make_examples
    from mergekit_seed.tools.demo.train import SEQUENCE_LENGTH

    assert max(len(example.text) for example in make_examples(500, 3)) <= SEQUENCE_LENGTH


def test_fine_tuning_is_deterministic_for_a_seed(tmp_path):
    from mergekit_seed.tools.demo.task import CharVocabulary, make_examples
    from mergekit_seed.tools.demo.train import BaseConfig, FinetuneConfig, build_base, finetune

    vocabulary = CharVocabulary()
    base = build_base(
        tmp_path / "base",
        BaseConfig(pretrain_steps=5, hidden_size=32, intermediate_size=64, num_hidden_layers=1),
        vocabulary,
        quiet=True,
    )
    train = make_examples(20, 0)
    config = FinetuneConfig("lora", steps=5, lr=1e-2)
    a = finetune(base, tmp_path / "a", train, config, 7, vocabulary, quiet=True)
    b = finetune(base, tmp_path / "b", train, config, 7, vocabulary, quiet=True)
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()


def test_analyze_matches_a_direct_computation(tiny_family, tmp_path):
    base, seeds = tiny_family
    result = run_cli("mergekit-seed", "analyze", *seeds, "--base", base, "--out", tmp_path / "an", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "an" / "analysis.json").read_text())
    for name in ("cosine.png", "spectra.png", "summary.md"):
        assert (tmp_path / "an" / name).stat().st_size > 0
    base_weights = load_weights(base)
    seed_weights = [load_weights(s) for s in seeds]
    matrices = [n for n, t in base_weights.items() if t.ndim == 2]
    assert report["weights"] == len(matrices)
    flat = [torch.cat([(w[n] - base_weights[n]).double().flatten() for n in matrices]) for w in seed_weights]
    expected = (flat[0] @ flat[1] / flat[0].norm() / flat[1].norm()).item()
    assert report["cosine_global"][0][1] == pytest.approx(expected, rel=1e-9)
    name = report["spectra"]["weight"]
    deltas = [(w[name] - base_weights[name]).double() for w in seed_weights]
    S = torch.linalg.svdvals(deltas[0])
    torch.testing.assert_close(
        torch.tensor(report["spectra"]["seeds"][seeds[0].name], dtype=torch.float64), S, rtol=1e-6, atol=1e-9
    )
    U = [torch.linalg.svd(d).U for d in deltas]
    heatmap = report["spectra"]["subspace_heatmap_0_1"]
    assert heatmap[1][3] == pytest.approx(float((U[0][:, :2].T @ U[1][:, :4]).pow(2).sum() / 2), rel=1e-6)
    layer0 = [n for n in matrices if ".layers.0." in n]
    shares = []
    for n in layer0:
        for w in seed_weights:
            values = torch.linalg.svdvals((w[n] - base_weights[n]).double())
            top = math.ceil(0.25 * min(w[n].shape))
            shares.append(float((values[:top] ** 2).sum() / (values**2).sum()))
    assert report["energy_top_share_per_layer"]["0"]["25%"] == pytest.approx(sum(shares) / len(shares), rel=1e-6)


def test_analyze_names_the_seeds_by_their_folders_and_writes_numbers_in_the_heatmap(
    tiny_family, tmp_path, monkeypatch
):
    """Issue 49: cosine.png called the folders seed1..3 seed0..2, summary.md said "seeds 0-1",
    and the heatmap's cells carried no numbers."""
    base, seeds = tiny_family
    written, ticks = drawn(monkeypatch, "text", 2), drawn(monkeypatch, "set_xticks", 1)
    run_cli("mergekit-seed", "analyze", *seeds, "--base", base, "--out", tmp_path / "an", "--quiet", check=True)
    report = json.loads((tmp_path / "an" / "analysis.json").read_text())
    names = [seed.name for seed in seeds]
    assert report["labels"] == names and list(report["spectra"]["seeds"]) == names
    assert f"{names[0]} & {names[1]}" in report["subspace_similarity"]
    assert list(names) in [list(labels) for labels in ticks if labels is not None]
    cosine = report["cosine_global"]
    assert {f"{value:.2f}" for row in cosine for value in row} <= set(written)
    summary = (tmp_path / "an" / "summary.md").read_text()
    assert all(name in summary for name in names) and "seeds 0-1" not in summary


def test_analyze_reads_adapters_without_a_base(tmp_path):
    from conftest import save_random_lora, save_random_sera
    from tiny import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base")
    seeds = [
        save_random_lora(base, tmp_path / "a", r=4, seed=1),
        save_random_sera(base, tmp_path / "b", r=4, split=2, seed=2),
    ]
    result = run_cli("mergekit-seed", "analyze", *seeds, "--out", tmp_path / "an", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert report["weights"] == 4 and len(report["subspace_similarity"]["a & b"]) == 4
    assert subspace_similarity(torch.eye(5), torch.eye(5), 3, 3) == 1.0
    missing = run_cli("mergekit-seed", "analyze", tmp_path / "a")
    assert missing.returncode != 0


def test_the_documented_results_are_the_shipped_results_files():
    """docs/demo.md's tables, the README's sentence and the package's shipped.json are
    generated from every docs/demo-results-<capability>.json; each is a full run of the
    current protocol under its own kernels, in the papers' regime."""
    from pathlib import Path

    from mergekit_seed.tools.demo.pipeline import DemoConfig
    from mergekit_seed.tools.demo.shipped import SUMMARY_FILE, readme_sentence, results_section, summarise_files

    root = Path(__file__).parent.parent
    files = sorted((root / "docs").glob("demo-results-*.json"))
    assert len(files) >= 2, files  # default and AVX2 on our machines; AVX-512 where a CPU has it
    page = (root / "docs" / "demo.md").read_text()
    section = page.split("<!-- results:begin -->\n", 1)[1].split("<!-- results:end -->", 1)[0]
    assert section.strip() == results_section(files).strip()
    readme = (root / "README.md").read_text()
    sentence = readme.split("<!-- demo:begin -->\n", 1)[1].split("<!-- demo:end -->", 1)[0]
    assert sentence.strip() == readme_sentence(summarise_files(files))
    assert json.loads(SUMMARY_FILE.read_text()) == json.loads(json.dumps(summarise_files(files)))
    capabilities = []
    pinned = (root / "constraints.txt").read_text().splitlines()
    for file in files:
        results = json.loads(file.read_text())
        assert results["config"] == json.loads(json.dumps(DemoConfig().to_dict())), (
            file
        )  # the current full configuration and protocol
        assert results["experiments"] >= 3
        capabilities.append(results["environment"]["cpu_capability"])
        assert file.name == f"demo-results-{capabilities[-1].lower()}.json"
        for setting, entry in results[
            "settings"
        ].items():  # the regime the papers study, on the seeds alone (validation)
            regime = entry["regime_on_validation"]
            assert all(0.2 <= value <= 0.9 for value in regime["mean_seed_per_skill"].values()), (file, setting)
            assert regime["disagreement"] >= 0.1, (file, setting)
        for package in ("torch", "transformers", "peft", "mergekit", "numpy", "safetensors", "tokenizers"):
            version = results["environment"]["versions"][package].split("+")[0]
            assert f"{package}=={version}" in pinned, package
    assert len(set(capabilities)) == len(capabilities)


def test_the_demo_says_where_its_numbers_fall_against_the_shipped_ones():
    """A run inside the shipped range says so; one outside names the setting, the range and why;
    both compare their verdict with the shipped one."""
    import copy
    from pathlib import Path

    from mergekit_seed.tools.demo.shipped import explain, shipped

    root = Path(__file__).parent.parent
    (first, *_) = sorted((root / "docs").glob("demo-results-*.json"))
    results = json.loads(first.read_text())
    inside = explain(results, shipped())
    assert inside[0].startswith(f"torch CPU capability: {results['environment']['cpu_capability']}")
    assert "inside the shipped range" in inside[1] and "agrees with the shipped one" in inside[2]
    moved = copy.deepcopy(results)
    moved["settings"]["lora"]["mean_seed"] = 0.05
    outside = explain(moved, shipped())
    assert "outside the shipped range: lora 5.0%" in outside[1] and "float kernels" in outside[1]
    better = copy.deepcopy(results)
    better["settings"]["full"]["versus_best_seed"]["seedft"]["verdict"] = "better"
    assert "differs from the shipped one" in explain(better, shipped())[2]
    quick = copy.deepcopy(results)
    quick["config"]["quick"] = True
    assert "not comparable" in explain(quick, shipped())[1]


def test_the_documented_scale_ladder_is_the_shipped_one():
    """docs/demo.md's scale table is benchmarks/demo_scale.py's table of docs/demo-scale.json,
    three sizes of the same task, each a full experiment of the current protocol."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).parent.parent
    spec = importlib.util.spec_from_file_location("demo_scale", root / "benchmarks" / "demo_scale.py")
    demo_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_scale)
    by_size = json.loads((root / "docs" / "demo-scale.json").read_text())
    assert len(by_size) == 3 and [results["parameters"] for results in by_size.values()] == sorted(
        r["parameters"] for r in by_size.values()
    )
    page = (root / "docs" / "demo.md").read_text()
    section = page.split("<!-- scale:begin -->\n", 1)[1].split("<!-- scale:end -->", 1)[0]
    assert section.strip() == demo_scale.table(by_size).strip()
    for size, results in by_size.items():
        assert (
            results["config"] == json.loads(json.dumps(demo_scale.config_for(size).to_dict()))
            and results["experiments"] == 1
        )


def test_the_documented_regime_of_a_shorter_demo_is_the_measured_one():
    """docs/demo.md says why the demo was not shortened, quoting benchmarks/demo-regime-shrink.json:
    every skill it names below 20%, with its accuracy, and only those."""
    import re
    from pathlib import Path

    root = Path(__file__).parent.parent
    reports = json.loads((root / "benchmarks" / "demo-regime-shrink.json").read_text())
    section = re.search(
        r"<!-- shrink:begin -->(.*?)<!-- shrink:end -->", (root / "docs" / "demo.md").read_text(), re.S
    ).group(1)
    for setting, label in (("lora", "LoRA"), ("sera", "SeRA"), ("full", "full")):
        below = [
            f"{skill} {100 * value:.1f}%"
            for skill, value in reports["steps_200"][setting]["mean_seed_per_skill"].items()
            if value < 0.2
        ]
        assert below and f"  - {label}: {', '.join(below)}" in section
    half = reports["pretrain_400_lora"]
    assert (
        f"at {100 * half['base_accuracy_all']:.1f}% accuracy" in section
        and f"at {100 * half['mean_seed_accuracy']:.1f}%." in section
    )
