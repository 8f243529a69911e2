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


@pytest.mark.parametrize("block", list(yaml_blocks()))
def test_every_documented_recipe_validates(block, tiny_family, tiny_loras, tmp_path):
    recipe = yaml.safe_load(block)
    assert isinstance(recipe, dict) and "merge_method" in recipe, "a YAML block in the docs that is not a recipe"
    adapter = "output" in recipe  # the output section is the adapter route's
    base, seeds = tiny_loras if adapter else tiny_family
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(fill(recipe, base, seeds)), encoding="utf-8")
    result = run_cli("mergekit-seed", "validate", path)
    assert result.returncode == 0 and "1 recipe(s) valid" in result.stdout, result.stderr
