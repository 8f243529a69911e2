"""Every YAML block in README.md and docs/ is a recipe that validates, with its placeholder
paths filled in with tiny models (adapter recipes with tiny PEFT LoRA adapters)."""

import re
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

REPO = Path(__file__).parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def yaml_blocks():
    for page in PAGES:
        for number, match in enumerate(re.finditer(r"```ya?ml\n(.*?)```", page.read_text(encoding="utf-8"), re.S)):
            yield pytest.param(match.group(1), id=f"{page.relative_to(REPO)}#{number}")


def fill(recipe: dict, base: Path, seeds) -> dict:
    """The recipe with its base and models replaced, in order, by ``base`` and ``seeds``."""
    if "base_model" in recipe:
        recipe["base_model"] = str(base)
    for index, entry in enumerate(recipe.get("models") or []):
        entry["model"] = str(seeds[index % len(seeds)])
    for piece in recipe.get("slices") or []:
        for index, source in enumerate(piece["sources"]):
            source["model"] = str(seeds[index % len(seeds)])
    return recipe


def is_select_grid(block: dict) -> bool:
    """A `select --grid` file (docs/select.md): method names mapping to parameter values."""
    from mergekit_seed.tools.selection import MERGEKIT_METHODS, OUR_METHODS

    return all(key in OUR_METHODS + MERGEKIT_METHODS and isinstance(value, dict) for key, value in block.items())


@pytest.mark.parametrize("block", list(yaml_blocks()))
def test_every_documented_recipe_validates(block, tiny_family, tiny_loras, tmp_path):
    recipe = yaml.safe_load(block)
    if is_select_grid(recipe):  # every candidate of the grid checked as select checks it
        from mergekit_seed.tools.selection import candidates, parsed_candidates, read_grid

        path = tmp_path / "grid.yml"
        path.write_text(block, encoding="utf-8")
        base, seeds = tiny_family
        found = candidates(list(recipe), read_grid(path))
        assert len(parsed_candidates(found, str(base), [str(s) for s in seeds], "full")) > 1
        return
    assert isinstance(recipe, dict) and "merge_method" in recipe, "a YAML block in the docs that is not a recipe"
    adapter = "output" in recipe  # the output section is the adapter route's
    base, seeds = tiny_loras if adapter else tiny_family
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(fill(recipe, base, seeds)), encoding="utf-8")
    result = run_cli("mergekit-seed", "validate", path)
    assert result.returncode == 0 and "1 recipe(s) valid" in result.stdout, result.stderr


GENERATED = re.compile(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", re.S)
# what a page would quote from a demo run: an accuracy (53.5%), a difference in points (-0.7 pt),
# a measured cosine; generated sections are held to the shipped results by tests/test_demo.py
DEMO_NUMBER = re.compile(r"\b\d{2}\.\d%|[+-]\d+\.\d pt\b|cosines? (?:of |about |is )?\d\.\d\d")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_a_demo_number_appears_only_where_a_test_checks_it(page):
    """Issue 41: numbers copied by hand from a demo run went stale while the suite passed.
    Outside the generated sections, no page quotes one; pages point to docs/demo.md instead."""
    text = GENERATED.sub("", page.read_text(encoding="utf-8"))
    assert not DEMO_NUMBER.findall(text), DEMO_NUMBER.findall(text)
