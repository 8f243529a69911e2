"""The counterparts of mergekit that an adapter merge keeps instead of importing mergekit.config,
.common and .options (issue 48): each is held to mergekit's own, so that a mergekit release that
changes them fails here instead of drifting silently."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typing_extensions import get_args

from mergekit_seed.recipe import AdapterMergeConfig, DtypeName, torch_dtype
from mergekit_seed.runner import AdapterRunOptions


PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

SCALARS = st.one_of(
    st.booleans(), st.integers(-3, 3), st.floats(-2, 2, allow_nan=False), st.sampled_from(["auto", "x", ""])
)
CONDITIONS = st.fixed_dictionaries(
    {"value": st.one_of(SCALARS, st.lists(SCALARS, max_size=3))},
    optional={"filter": st.one_of(st.none(), st.sampled_from(["q_proj", "*", ""]), st.integers()), "extra": SCALARS},
)
ANYTHING = st.one_of(st.none(), SCALARS, st.dictionaries(st.sampled_from(["a", "value"]), SCALARS, max_size=2))
SETTINGS = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    CONDITIONS,
    st.lists(CONDITIONS, max_size=3),
    ANYTHING,
    st.lists(ANYTHING, max_size=2),
    st.dictionaries(st.just("value"), st.dictionaries(st.just("x"), SCALARS, max_size=1), max_size=1),
)
PARAMETERS = st.one_of(
    st.none(), st.dictionaries(st.sampled_from(["lambda", "weight", "density"]), SETTINGS, max_size=3)
)
DTYPES = st.one_of(st.none(), st.sampled_from(list(get_args(DtypeName))))
MODELS = st.lists(
    st.fixed_dictionaries(
        {"model": st.sampled_from(["/runs/seed1", "org/adapter", "org/adapter@main"])},
        optional={"parameters": PARAMETERS},
    ),
    max_size=3,
)
RECIPES = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(["seedft", "lore"]), "models": MODELS},
    optional={
        "base_model": st.one_of(st.none(), st.sampled_from(["/runs/base", "org/base"])),
        "parameters": PARAMETERS,
        "dtype": DTYPES,
        "out_dtype": DTYPES,
    },
)


def _accepted(model, data) -> bool:
    try:
        model.model_validate(data)
    except (ValidationError, RuntimeError, ValueError):
        return False
    return True


@PROPERTY
@given(recipe=RECIPES)
def test_the_adapter_recipe_schema_accepts_exactly_what_mergekits_does(recipe):
    """On the fields both have (method, models and their parameters, base, global parameters,
    dtypes of the names mergekit knows), AdapterMergeConfig accepts a recipe if and only if
    mergekit's MergeConfiguration does."""
    from mergekit.config import MergeConfiguration

    assert _accepted(AdapterMergeConfig, recipe) == _accepted(MergeConfiguration, recipe), recipe


def test_the_deliberate_differences_are_refusals_mergekit_makes_later():
    """What only ours refuses at parse time: a misspelt key (mergekit ignores it) and a dtype name
    mergekit's dtype_from_name would refuse mid-merge."""
    from mergekit.common import dtype_from_name

    base = {"merge_method": "seedft", "models": [{"model": "/runs/a"}]}
    assert not _accepted(AdapterMergeConfig, {**base, "parmeters": {"lambda": 1}})
    assert not _accepted(AdapterMergeConfig, {**base, "dtype": "float33"})
    with pytest.raises(Exception):
        dtype_from_name("float33")


@pytest.mark.parametrize("name", [None, *get_args(DtypeName)])
def test_torch_dtype_is_mergekits_dtype_from_name(name):
    from mergekit.common import dtype_from_name

    expected = None if name is None else dtype_from_name(name)
    assert torch_dtype(name) == expected and (expected is None or isinstance(expected, torch.dtype))


def test_the_adapter_run_options_are_mergekits_fields_with_mergekits_defaults():
    from mergekit.options import MergeOptions

    for name, field in AdapterRunOptions.model_fields.items():
        assert name in MergeOptions.model_fields, name
        theirs = MergeOptions.model_fields[name]
        assert (field.default, field.annotation) == (theirs.default, theirs.annotation), name
    # and they resolve the device as mergekit's command line does: --cuda means the GPU
    assert AdapterRunOptions(cuda=True).device == "cuda" and AdapterRunOptions().device == "cpu"
