"""The plugin never breaks mergekit, and merging is a Python API the CLI only wraps."""

import subprocess
import sys
import textwrap

import pytest
from conftest import recipe_text, run_cli, save_random_lora, write_recipe

import mergekit_seed
from mergekit_seed.errors import UserError


def run_python(code: str, prelude: str = "") -> subprocess.CompletedProcess:
    """A fresh interpreter (the .pth hook runs at its start), as a user's process would be."""
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True)


def test_a_broken_install_of_ours_leaves_stock_mergekit_working(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = tmp_path / "linear.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {seeds[0]}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {seeds[1]}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    out = tmp_path / "out"
    broken = 'import sys; sys.modules["mergekit_seed.maths.kernels.lore"] = None  # one module of ours unimportable\n'
    done = run_python(
        prelude=broken,
        code=f"""
        sys.argv = ["mergekit-yaml", {str(recipe)!r}, {str(out)!r}]
        from mergekit.scripts.run_yaml import main
        main()
    """,
    )
    assert done.returncode == 0, done.stderr
    assert list(out.glob("*.safetensors"))
    ours = [line for line in done.stderr.splitlines() if "mergekit-seed" in line]
    assert len(ours) == 1, done.stderr
    assert ours[0].startswith("warning: mergekit-seed 0.1.0 could not register its merge methods with mergekit 0.1.5")
    assert "mergekit-seed methods" in ours[0] and "Traceback" not in done.stderr

    done = run_python(
        prelude=broken,
        code="""
        sys.argv = ["mergekit-seed", "methods"]
        from mergekit_seed.cli import main
        main()
    """,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not register" in errors[0], done.stderr


def test_a_foreign_method_under_our_name_is_kept_and_reported():
    done = run_python("""
        import copy, dataclasses
        from mergekit_seed import startup
        startup._uninstall()  # register the foreign method before ours
        from mergekit.merge_methods import registry
        foreign = copy.copy(registry.get("linear"))
        foreign.spec = dataclasses.replace(foreign.spec, name="lore")
        registry.register(foreign)
        import mergekit_seed
        problems = mergekit_seed.register()
        assert registry.get("lore") is foreign, "ours replaced theirs"
        assert registry.get("seedft").spec.name == "seedft"
        print(len(problems))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'lore' is already registered by mergekit" in warnings[0], done.stderr


def test_registering_twice_reports_nothing():
    assert mergekit_seed.register() == []
    assert mergekit_seed.register() == []


def test_merge_api_full_and_adapter_recipes(tiny_family, tmp_path):
    from mergekit_seed.references.weights import load_weights

    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "full.yml", "seedlora_dm", base, seeds)
    result = mergekit_seed.merge(recipe, tmp_path / "full", quiet=True)
    assert result.kind == "full" and result.card.is_file()
    with pytest.raises(UserError, match=r"overwrite=True from Python"):  # the Python spelling, not only the flag
        mergekit_seed.merge(recipe, tmp_path / "full", quiet=True)
    cli_out = tmp_path / "cli"
    run_cli("mergekit-seed", "run", recipe, cli_out, "--quiet", check=True)
    api, cli = load_weights(result.out), load_weights(cli_out)
    assert all((api[name] == cli[name]).all() for name in cli)

    adapters = [save_random_lora(base, tmp_path / f"lora{i}", r=2, seed=i) for i in range(2)]
    recipe = tmp_path / "lora.yml"
    recipe.write_text(recipe_text("seedft", base, adapters, output={"format": "lora"}))
    result = mergekit_seed.merge(recipe, tmp_path / "adapter", quiet=True, random_seed=3)
    assert result.kind == "lora" and (result.out / "adapter_model.safetensors").is_file()
    assert {module.name for module in result.modules} == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")
    }


def test_merge_api_raises_the_line_the_cli_prints(tiny_family, tmp_path):
    base, seeds = tiny_family
    recipe = write_recipe(tmp_path / "bad.yml", "seedft", base, seeds, parameters={"rnak": 2, "rtol": -1})
    with pytest.raises(mergekit_seed.RecipeProblems) as raised:
        mergekit_seed.merge(recipe, tmp_path / "out")
    cli = run_cli("mergekit-seed", "run", recipe, tmp_path / "out")
    assert [f"error: {problem}" for problem in raised.value.problems] == cli.stderr.strip().splitlines()
    assert len(raised.value.problems) == 2 and str(raised.value) == raised.value.problems[0]
    assert not (tmp_path / "out").exists()


def test_merge_api_leaves_nothing_half_written(tiny_family, tmp_path):
    from safetensors.torch import load_file, save_file

    base, seeds = tiny_family
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in seeds[1].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yml", "seedft", base, [seeds[0], broken])
    out = tmp_path / "out"
    with pytest.raises(UserError, match="NaN or Inf"):
        mergekit_seed.merge(recipe, out, quiet=True)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_num_threads_applies_to_every_merge_in_one_process(tiny_family, tmp_path):
    """torch takes an inter-op thread count once per process: later merges must still run."""
    base, seeds = tiny_family
    full = write_recipe(tmp_path / "full.yml", "seedft", base, seeds)
    adapters = [save_random_lora(base, tmp_path / f"lora{i}", r=2, seed=i) for i in range(2)]
    adapter = tmp_path / "lora.yml"
    adapter.write_text(recipe_text("seedft", base, adapters, output={"format": "lora"}))
    runs = [(1, full), (2, full), (1, adapter)]
    code = f"""
        import torch, mergekit_seed
        for index, (threads, recipe) in enumerate({[(t, str(r)) for t, r in runs]!r}):
            mergekit_seed.merge(recipe, {str(tmp_path)!r} + f"/out{{index}}", quiet=True, num_threads=threads)
            print(torch.get_num_threads())
    """
    process = run_python(code)
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["1", "2", "1"]


def test_the_lazy_api_is_in_the_package_namespace():
    import mergekit_seed

    assert {"merge", "MergeResult", "RecipeProblems", "UserError", "register"} <= set(dir(mergekit_seed))
    assert callable(mergekit_seed.merge) and "revisions" in mergekit_seed.merge.__doc__


def test_a_second_plugin_installed_beside_ours_that_claims_one_of_our_names(tmp_path):
    """Another plugin with the same kind of .pth hook, registering `lore` when mergekit's
    registry is imported. Our hook claims our names at that first import, so theirs comes
    second: mergekit's own register() refuses it with ValueError (in their code), and `lore`
    stays ours. Both plugins' other methods work."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "other_plugin.py").write_text(
        textwrap.dedent("""
        import copy, dataclasses
        from mergekit.merge_methods import registry
        for name in ("lore", "other_linear"):
            method = copy.copy(registry.get("linear"))
            method.spec = dataclasses.replace(method.spec, name=name)
            try:
                registry.register(method)
                print("registered", name)
            except ValueError as error:
                print("refused", name, "-", error)
    """)
    )
    (site_dir / "zz_other_plugin.pth").write_text("import other_plugin\n")
    done = run_python(
        """
        import site
        site.addsitedir(sys.argv[1])  # as site-packages does with an installed plugin's .pth
        from mergekit.merge_methods import registry
        import mergekit_seed.methods as ours
        print("lore is ours:", registry.get("lore") is ours.METHODS[[m.spec.name for m in ours.METHODS].index("lore")])
        print("other_linear:", registry.get("other_linear").spec.name)
    """.replace("sys.argv[1]", repr(str(site_dir))),
        prelude="import sys\n",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("refused lore - ") and "already registered" in line for line in lines), done.stdout
    assert (
        "registered other_linear" in lines and "lore is ours: True" in lines and "other_linear: other_linear" in lines
    )
