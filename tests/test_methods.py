"""One list of our methods (issue 48): adding a method is one kernel and one entry in
``methods.METHODS``. A toy fifth method, added to a temporary registry and nowhere else, shows
up in ``methods``, ``validate``, ``run`` (full and adapter routes) and ``select --dry-run``."""

import json

import pytest
import torch
from conftest import refused, run_cli, write_recipe, write_splits

from mergekit_seed.methods import LAMBDA, METHODS, SeedMergeMethod, our_method_names
from mergekit_seed.references.adapter_files import read_adapter
from mergekit_seed.references.weights import load_weights


def _mean_kernel(tau, parameters, group) -> torch.Tensor:
    return torch.stack(tau).mean(0)


TOY = SeedMergeMethod(
    name="toy_mean",
    pretty_name="Toy mean",
    paper="A toy method of the registry test",
    reference_url="https://example.org/toy",
    parameters=(LAMBDA,),
    kernel=_mean_kernel,
    select_grid={"lambda": (1.0, 0.5)},
    in_demo=False,
)


@pytest.fixture
def toy(monkeypatch):
    from mergekit.merge_methods import registry

    from mergekit_seed import methods

    monkeypatch.setattr(methods, "METHODS", METHODS + (TOY,))
    monkeypatch.setitem(registry._METHODS, TOY.spec.name, TOY)
    return TOY


def test_the_list_is_the_methods_command(toy):
    described = json.loads(run_cli("mergekit-seed", "methods", "--json", check=True).stdout)
    assert [entry["name"] for entry in described] == list(our_method_names()) and described[-1]["name"] == "toy_mean"


def test_a_fifth_method_validates_and_merges_full_models(toy, tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "r.yml", "toy_mean", base, seeds, parameters={"lambda": 1.0})
    assert "1 recipe(s) valid" in run_cli("mergekit-seed", "validate", recipe, check=True).stdout
    misspelt = write_recipe(tmp_path / "bad.yml", "toy_mean", base, seeds, parameters={"lamda": 1.0})
    refused(run_cli("mergekit-seed", "validate", misspelt), "unknown parameter 'lamda' for toy_mean")
    run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet", check=True)
    merged, base_weights = load_weights(tmp_path / "out"), load_weights(base)
    seed_weights = [load_weights(seed) for seed in seeds]
    for name, tensor in merged.items():
        expected = torch.stack([weights[name].double() for weights in seed_weights]).mean(0)
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6), name
    assert "Toy mean" in (tmp_path / "out" / "README.md").read_text()
    assert set(merged) == set(base_weights)


def test_a_fifth_method_merges_adapters_natively(toy, tiny_loras, tmp_path):
    base, loras = tiny_loras
    recipe = write_recipe(tmp_path / "r.yml", "toy_mean", base, loras, output={"format": "lora"})
    run_cli("mergekit-seed", "run", recipe, tmp_path / "out", "--quiet", check=True)
    merged = read_adapter(tmp_path / "out").deltas
    seeds = [read_adapter(lora).deltas for lora in loras]
    for name, delta in merged.items():
        expected = torch.stack([seed[name].dense().double() for seed in seeds]).mean(0)
        torch.testing.assert_close(delta.dense().double(), expected, rtol=1e-4, atol=1e-6), name


def test_select_tries_a_fifth_method_with_its_grid(toy, tiny_family, tmp_path):
    base, seeds = tiny_family
    validation, test = write_splits(tmp_path)
    dry = run_cli(
        "mergekit-seed",
        "select",
        *seeds,
        "--base",
        base,
        "--validation",
        validation,
        "--test",
        test,
        "--out",
        tmp_path / "out",
        "--dry-run",
        check=True,
    )
    assert "toy_mean lambda=1.0" in dry.stdout and "toy_mean lambda=0.5" in dry.stdout


def test_the_demo_leaves_out_what_its_spec_says(toy):
    from mergekit_seed.tools.demo.pipeline import ours

    assert "toy_mean" not in ours() and set(ours()) == {m.spec.name for m in METHODS if m.in_demo}


def _equations(text: str) -> set:
    """The equation numbers a text cites ("Eq. 4", "Eqs. 2 and 7")."""
    import re

    return {int(number) for cited in re.findall(r"Eqs?\. [\d, and-]+", text) for number in re.findall(r"\d+", cited)}


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.spec.name)
def test_a_parameter_cites_the_same_equations_in_methods_and_on_its_docs_page(method):
    """Issue 49: `mergekit-seed methods` gave seedft's lambda as Eq. 7, its docs page as Eq. 2."""
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "methods" / f"{method.spec.name}.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in page.splitlines() if line.startswith("| `")}
    for parameter in method.parameters:
        cited = _equations(parameter.description)
        if cited:
            assert _equations(rows[parameter.name]) == cited, (parameter.name, rows[parameter.name])


def test_no_help_text_copies_the_list_of_methods():
    """select --help listed the default methods by hand: a fifth method would have been left out."""
    from click.testing import CliRunner

    from mergekit_seed.cli import main

    for command in main.commands:
        text = CliRunner().invoke(main, [command, "--help"]).output
        assert not [name for name in our_method_names() if name in text], (command, text)
