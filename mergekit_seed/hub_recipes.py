"""Hub ids in a recipe: which it names, and the recipe with them resolved to snapshot folders."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from mergekit_seed.recipe import Recipe, parse_recipe, rewrite_references
from mergekit_seed.references.hub import HubInput, is_hub_id, resolve, split_revision


def hub_references(recipe: Recipe) -> List[str]:
    """Every Hub id the recipe names (with its ``@revision`` if given), in order, once."""
    config = recipe.config
    found: List[str] = []
    if recipe.is_adapter_recipe:
        names = config.referenced_models()
    else:
        names = []
        for reference in config.referenced_models():
            for path in (reference.model, reference.lora):
                if path is not None:
                    names.append(f"{path.path}@{path.revision}" if path.revision else str(path.path))
        tokenizer = getattr(config, "tokenizer", None)
        source = getattr(config, "tokenizer_source", None) or getattr(tokenizer, "source", None)
        if source is not None and not isinstance(source, str):  # a model reference, not base/union
            names.append(str(source))
    for name in names:
        if is_hub_id(split_revision(name)[0]) and name not in found:
            found.append(name)
    return found


def localize(
    recipe: Recipe, pins: Optional[Dict[str, str]] = None, read: Optional[List[str]] = None
) -> Tuple[Recipe, List[HubInput]]:
    """``recipe`` with every Hub id the merge reads replaced by its snapshot folder, and the
    resolved inputs.

    ``pins`` maps repo ids to the commit to use (a card's recorded revisions); otherwise each id
    resolves at the revision it names, else ``main``. ``read`` limits the ids to those the merge
    reads (a LoRA-out adapter merge only names its base: it is not downloaded).
    """
    references = [r for r in hub_references(recipe) if read is None or r in read]
    if not references:
        return recipe, []
    pins = pins or {}
    inputs = [resolve(reference, pins.get(split_revision(reference)[0])) for reference in references]
    folders = {entry.reference: str(entry.folder) for entry in inputs}
    return parse_recipe(rewrite_references(recipe.source, folders, recipe.origin), recipe.origin), inputs
