"""The docs hold up: every YAML block in README.md and docs/ is a recipe that validates, with its
placeholder paths filled in with tiny models (adapter recipes with tiny PEFT LoRA adapters), and
every figure a page quotes from the demo or a benchmark is the one its results file holds."""

import json
import re
import sys
from decimal import ROUND_HALF_DOWN, ROUND_HALF_UP, Decimal
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
    from mergekit_seed.methods import our_method_names
    from mergekit_seed.tools.selection.candidates import MERGEKIT_METHODS

    return all(
        key in our_method_names() + MERGEKIT_METHODS and isinstance(value, dict) for key, value in block.items()
    )


@pytest.mark.parametrize("block", list(yaml_blocks()))
def test_every_documented_recipe_validates(block, tiny_family, tiny_loras, tmp_path):
    recipe = yaml.safe_load(block)
    if is_select_grid(recipe):  # every candidate of the grid checked as select checks it
        from mergekit_seed.tools.selection.candidates import candidates, parsed_candidates, read_grid

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


# Where each page's measured figures come from: the benchmarks' reports and raw numbers, and the
# demo's shipped results. A page not named here quotes none.
BENCHMARKS = ["benchmarks/RESULTS.md"]
STARTUP = ["benchmarks/startup.json"]
FIGURE_SOURCES = {
    "docs/performance.md": BENCHMARKS + STARTUP,
    "docs/architecture.md": STARTUP,
    "docs/cli.md": STARTUP,
    "docs/compare.md": STARTUP,
    "docs/select.md": ["benchmarks/select-bench.json", "benchmarks/select-scale.json"] + BENCHMARKS,
    "README.md": ["benchmarks/demo-timing.json"],
    "docs/demo.md": [
        "docs/demo-results-default.json",
        "docs/demo-results-avx2.json",
        "docs/demo-scale.json",
        "benchmarks/demo-regime-shrink.json",
        "benchmarks/demo-timing.json",
    ],
    "docs/methods/lore.md": BENCHMARKS,
    "docs/methods/seedft.md": BENCHMARKS,
    "docs/methods/seedlora_dm.md": BENCHMARKS,
    "docs/methods/seedlora_twostage.md": BENCHMARKS,
}
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
# a measured figure: a ratio (1.06x), a duration, a size, a rate or a share, alone or as a range
FIGURE = re.compile(
    r"(?<![\w.\-/^])(?P<low>\d+(?:\.\d+)?)(?:-(?P<high>\d+(?:\.\d+)?))?"
    r"(?P<unit>x\b| ?(?:s|ms|min|MiB|GiB|GB|GFLOP/s)\b|%)"
)
GOAL = re.compile(r"(?:<=|>=|<|>|under|at most|at least|within) ?$")
# figures that are settings, goals or a paper's claim, not something we measured
NOT_MEASURED = {
    "95%": "the confidence level of every interval",
    "1%": "a benchmark spectrum's noise level (--spectrum noise-1)",
    "5%": "a benchmark spectrum's noise level (--spectrum noise-5)",
    "1-20%": "the benchmark spectra's noise levels",
    "20%": "the demo regime's floor, and a benchmark spectrum's noise level (--spectrum noise-20)",
    "20-90%": "the demo regime's bounds",
    "90%": "the demo regime's ceiling",
    "10%": "the demo regime's disagreement floor, and analysis.md's quantile marks",
    "25%": "analysis.md's quantile marks",
    "50%": "analysis.md's median mark",
    "1 s": "the bound on a pattern match, and the rule for a measured shortcut",
    "10 s": "the Hub check's timeout",
    "1 MiB": "the reader's bound on a recipe",
    "16 MiB": "the reader's bound on a card or a grid",
    "64 MiB": "the reader's bound on a JSON file",
    "1 GiB": "the reader's bound on JSONL data",
    "1 GB": "the size of the attack matrix's sparse file",
    "2.26x": "the LoRE paper's reported cost (Table 6), not ours",
}


def measured_numbers(page: Path) -> list:
    """Every number in the page's results files, as text; a JSON file's numbers also as
    percentages (its shares are fractions)."""
    found = []
    for name in FIGURE_SOURCES.get(str(page.relative_to(REPO)), []):
        text = (REPO / name).read_text(encoding="utf-8")
        numbers = re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?", text)
        found += numbers
        if name.endswith(".json"):
            found += [str(Decimal(number) * 100) for number in numbers]
    return found


def rounds_to(measured: str, quoted: str, unit: str) -> bool:
    places = Decimal(quoted).as_tuple().exponent
    values = [Decimal(measured) / 60] if unit.strip() == "min" else [Decimal(measured)]  # results hold seconds
    # a tie either way: a file may hold 23.15 for the 23.149 a report printed as 23.1
    return any(
        value.quantize(Decimal(1).scaleb(places), rounding=rounding) == Decimal(quoted)
        for value in values
        for rounding in (ROUND_HALF_UP, ROUND_HALF_DOWN)
    )


def unsourced_figures(text: str, measured: list) -> list:
    text = GENERATED.sub("", text)
    comments = re.findall(
        r"(?:^|\s)# (.*)", "\n".join(re.findall(r"```.*?```", text, re.S))
    )  # a command's comment is prose
    text = CODE.sub("", text) + "\n" + "\n".join(comments)
    missing = []
    for match in FIGURE.finditer(text):
        figure = match.group(0).strip()
        if figure in NOT_MEASURED or GOAL.search(text[max(0, match.start() - 9) : match.start()]):
            continue
        for number in filter(None, (match.group("low"), match.group("high"))):
            if not any(rounds_to(value, number, match.group("unit")) for value in measured):
                missing.append(figure)
                break
    return missing


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_measured_figure_comes_from_a_results_file(page):
    """Issue 41: a page quotes a measured time, ratio, size or share only as one of its results
    files (``FIGURE_SOURCES``) holds it, to the digits quoted, in prose and in a command's
    comment alike."""
    missing = unsourced_figures(page.read_text(encoding="utf-8"), measured_numbers(page))
    assert not missing, f"{page.name}: figures no results file holds: {missing}"


def test_the_figure_check_catches_a_stale_figure():
    measured = ["1.06", "143.7", "1702.2"]
    assert unsourced_figures("seedlora_dm runs at 1.06x linear, twostage 144 s, demo 28.4 min", measured) == []
    assert unsourced_figures("seedlora_dm runs at 1.19x linear", measured) == ["1.19x"]
    assert unsourced_figures("goal <= 1.2x; `--timeout 900 s`", measured) == []
    assert unsourced_figures("```bash\nmake demo  # about 30.0 min\n```", measured) == ["30.0 min"]


def test_the_start_up_section_of_results_is_the_benchmarks_own_report():
    """benchmarks/RESULTS.md's start-up section is what benchmarks/startup.py reports from
    startup.json, so the pages checked against either file agree."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from startup import report  # the benchmark's own module: not importable before the path is set

    results = (REPO / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    assert report(json.loads((REPO / "benchmarks" / "startup.json").read_text(encoding="utf-8"))) in results


# a path into this repository (or into the package, written from its root), as docs and comments name them
REPO_PATH = re.compile(r"(?<![\w./~-])((?:docs|benchmarks|tests|recipes|mergekit_seed|\.ci)/[\w./-]*\w)")
# paths that name another project's files, not ours
ELSEWHERE = {"tests/common.py": "mergekit's sdist lacks it (docs/architecture.md, host tests)"}
PACKAGE_PATH = re.compile(r"(?<![\w./~-])((?:maths|references|engines|tools)/[\w./-]*\w\.py)")


def test_no_doc_or_comment_names_a_file_the_repository_lacks():
    """Issue 48: comments and docs pointed to a DESIGN.md the repository does not have. Every
    path a page, a module, a test or a benchmark names exists (globs and placeholders aside)."""
    sources = [*PAGES, *REPO.glob("mergekit_seed/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py")]
    missing = []
    for source in sources:
        text = source.read_text(encoding="utf-8")
        if "DESIGN.md" in text and source.name != "test_docs.py":
            missing.append(f"{source.relative_to(REPO)}: DESIGN.md")
        for match in REPO_PATH.finditer(text):
            path, after = match.group(1), text[match.end() : match.end() + 2]
            placeholder = "<" in after or "{" in after or any(mark in path for mark in ("*", "...", "NAME", "OUT"))
            if not placeholder and path not in ELSEWHERE and not (REPO / path).exists():
                missing.append(f"{source.relative_to(REPO)}: {path}")
        for path in PACKAGE_PATH.findall(text):
            if not (REPO / "mergekit_seed" / path).exists():
                missing.append(f"{source.relative_to(REPO)}: {path}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_what_the_docs_say_make_does_is_what_the_makefile_does():
    """Issue 49: the README said `make test` makes a fresh venv; the Makefile builds .venv only when
    it is missing (or pyproject.toml or constraints.txt changed) and reuses it."""
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^\$\(BIN\)/mergekit-seed: pyproject.toml constraints.txt$", makefile, re.M)
    assert "rm -rf $(VENV)" not in makefile  # nothing makes the venv afresh
    for page in PAGES:
        for line in page.read_text(encoding="utf-8").splitlines():
            if re.match(r"\s*make (demo|test)\b", line):
                assert "fresh" not in line, f"{page.name}: {line}"
