"""``mergekit-seed analyze``: look at seeds before choosing a method.

For full checkpoints (with their base) or adapter folders (no base needed), per 2-D weight:
- pairwise cosine similarity of the seed deltas, global and per layer (cf. the SeedLoRA
  papers' Fig. 2);
- singular value spectra of each seed's delta and of their SeedFT merge (cf. Fig. 3a);
- the share of energy in the top k% singular directions, per layer (cf. SeedFT Table 1);
- SeRA's Eq. 4 subspace similarity between seeds,
  phi(U_a, U_b, i, j) = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j).
Writes ``analysis.json``, PNG plots and ``summary.md``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from mergekit_seed.errors import UserError
from mergekit_seed.finite import report_json, require_finite_tensor
from mergekit_seed.maths.kernels.seedft import seedft, seedft_factored
from mergekit_seed.maths.linalg import DECOMPOSITION_DTYPE, LowRank, column_block_svd, factored_svd
from mergekit_seed.output import OutputFolder, local_paths, staged_path, write_text
from mergekit_seed.reader import safetensors_file
from mergekit_seed.references.adapter_files import is_adapter_folder, read_adapter
from mergekit_seed.references.weights import confined_glob, safetensors_index


Delta = Union[torch.Tensor, LowRank]
TOP_SHARES = (0.1, 0.25, 0.5)
SUBSPACE_DIRECTIONS = 8


def inner(a: Delta, b: Delta) -> float:
    """<a, b>_F, without materialising factored deltas."""
    if isinstance(a, LowRank) and isinstance(b, LowRank):
        left = a.left.to(DECOMPOSITION_DTYPE).T @ b.left.to(DECOMPOSITION_DTYPE)
        right = a.right.to(DECOMPOSITION_DTYPE) @ b.right.to(DECOMPOSITION_DTYPE).T
        return float((left * right).sum())
    return float((a.to(DECOMPOSITION_DTYPE) * b.to(DECOMPOSITION_DTYPE)).sum())


def left_spectrum(delta: Delta):
    """(U, S) of a delta, float64: factored QR-core SVD, or the Gram/eigh SVD for dense ones."""
    if isinstance(delta, LowRank):
        U, S, _, _ = factored_svd(delta, rtol=1e-12)
        return U, S
    svd = column_block_svd([delta], rtol=1e-12)
    return svd.U, svd.S


def subspace_similarity(U_a: torch.Tensor, U_b: torch.Tensor, i: int, j: int) -> float:
    """SeRA Eq. 4: ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j)."""
    return float((U_a[:, :i].T @ U_b[:, :j]).pow(2).sum() / min(i, j))


def layer_of(name: str) -> str:
    match = re.search(r"layers\.(\d+)\.", name)
    return match.group(1) if match else "other"


@dataclass
class Inputs:
    """The seeds' names and a way to get every seed's delta of one weight."""

    names: List[str]
    weight_names: List[str]
    deltas: Callable[[str], List[Delta]]


def load_inputs(models: Sequence[str], base: Optional[str]) -> Inputs:
    """Adapter folders (read as factored deltas) or full checkpoints minus ``base``."""
    if all(is_adapter_folder(m) for m in models):
        seeds = [read_adapter(m) for m in models]
        names = sorted(set().union(*(s.deltas for s in seeds)))
        for name in names:
            shapes = {
                model: tuple(seed.deltas[name].shape) for model, seed in zip(models, seeds) if name in seed.deltas
            }
            if len(set(shapes.values())) > 1:
                listing = ", ".join(f"{model} {shape}" for model, shape in shapes.items())
                raise UserError(f"tensor {name} has different shapes: {listing}; analyze compares seeds of one base")

        def adapter_deltas(name: str) -> List[Delta]:
            shape = next(s.deltas[name].shape for s in seeds if name in s.deltas)
            return [s.deltas.get(name) or LowRank.zeros(shape) for s in seeds]

        return Inputs(list(models), names, adapter_deltas)
    if base is None:
        raise UserError("full checkpoints need --base (the model the seeds were fine-tuned from)")

    def index(folder: str) -> Dict[str, Tuple[Path, tuple]]:
        files = confined_glob(Path(folder), "*.safetensors")
        if not files:
            raise UserError(f"{folder}: no .safetensors weights (and no adapter_config.json)")
        return safetensors_index(files)

    base_index = index(base)
    seed_indexes = [index(m) for m in models]

    def read(mapping: Dict[str, Tuple[Path, tuple]], name: str) -> torch.Tensor:
        file = mapping[name][0]
        with safetensors_file(file) as reader:
            tensor = reader.get_tensor(name).float()
        require_finite_tensor(tensor, f"{file}: tensor {name}", "re-export that checkpoint or leave it out")
        return tensor

    names = []
    for name in sorted(base_index):
        shape = base_index[name][1]
        if len(shape) != 2 or not all(name in seed_index for seed_index in seed_indexes):
            continue
        differing = [model for model, seed_index in zip(models, seed_indexes) if seed_index[name][1] != shape]
        if differing:
            raise UserError(
                f"tensor {name} is {seed_indexes[models.index(differing[0])][name][1]} in {differing[0]} but {shape} "
                "in the base "
                f"{base}; analyze compares seeds of one base: give the base they were fine-tuned from"
            )
        names.append(name)

    def full_deltas(name: str) -> List[Delta]:
        base_tensor = read(base_index, name)
        return [read(seed_index, name) - base_tensor for seed_index in seed_indexes]

    return Inputs(list(models), names, full_deltas)


def analyze(models: Sequence[str], base: Optional[str], out: Path, quiet: bool = False) -> dict:
    """Compute every statistic (:func:`analysis`) and publish ``analysis.json``, the plots and
    ``summary.md`` in ``out`` (:class:`~mergekit_seed.output.OutputFolder`: an earlier report
    there is replaced; a folder holding anything else, or an input, is refused)."""
    with OutputFolder(out, local_paths([*models, base]), command="analyze", report=True) as output:
        result = analysis(models, base, quiet)
        write_text(output.staging / "analysis.json", report_json(result, "analysis.json"))
        _plot(result, output.staging)
        write_text(output.staging / "summary.md", _summary(result))
        output.publish()
    return result


def _cosine(matrix: torch.Tensor) -> List[List[float]]:
    """A Gram matrix of deltas as their pairwise cosine similarities."""
    norms = matrix.diagonal().clamp_min(1e-300).sqrt()
    return (matrix / norms[:, None] / norms[None, :]).tolist()


def _showcase_spectra(name: str, deltas: list, decompositions: list, seed_names: List[str], k: int) -> dict:
    """The plotted weight: each seed's singular values, SeedFT's merge's (scaled by 1/sqrt(N)),
    and the subspace similarity of the first two seeds' top directions."""
    count = len(deltas)
    if isinstance(deltas[0], LowRank):
        merged = seedft_factored(deltas)
        merged_S = left_spectrum(LowRank(merged.left / math.sqrt(count), merged.right))[1]
    else:
        merged_S = left_spectrum(seedft(deltas) / math.sqrt(count))[1]
    spectra = {
        "weight": name,
        "seeds": {seed: S.tolist() for (_, S), seed in zip(decompositions, seed_names)},
        "seedft_merge": merged_S.tolist(),
    }
    if k > 0:
        U_a, U_b = decompositions[0][0], decompositions[1][0]
        spectra["subspace_heatmap_pair"] = [seed_names[0], seed_names[1]]
        spectra["subspace_heatmap_0_1"] = [
            [subspace_similarity(U_a, U_b, i, j) for j in range(1, k + 1)] for i in range(1, k + 1)
        ]
    return spectra


def display_names(models: Sequence[str]) -> List[str]:
    """What the report calls each seed: its folder's name (with its parent's where two share one)."""
    names = [Path(model).name or str(model) for model in models]
    return ["/".join(Path(model).parts[-2:]) if names.count(name) > 1 else name for model, name in zip(models, names)]


def analysis(models: Sequence[str], base: Optional[str], quiet: bool = False) -> dict:
    """Every statistic of the seeds' deltas (what ``analysis.json`` holds); seeds are named by
    their folders (:func:`display_names`) in every key and plot."""
    from tqdm import tqdm

    if len(models) < 2:
        raise UserError("analyze needs at least 2 models (seeds)")
    inputs = load_inputs(models, base)
    if not inputs.weight_names:
        raise UserError("no 2-D weights are shared by the inputs")
    count = len(models)
    labels = display_names(models)
    pairs = [(a, b) for a in range(count) for b in range(a + 1, count)]
    dots = torch.zeros(count, count, dtype=DECOMPOSITION_DTYPE)
    layer_dots: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(count, count, dtype=DECOMPOSITION_DTYPE))
    energy: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    subspace: Dict[str, List[List[float]]] = {f"{labels[a]} & {labels[b]}": [] for a, b in pairs}
    spectra: Dict[str, dict] = {}
    # the weight whose spectra are plotted: the largest one in the first layer
    showcase = max(inputs.weight_names, key=lambda n: (layer_of(n) == "0", "proj" in n))

    for name in tqdm(inputs.weight_names, desc="Analyzing weights", disable=quiet):
        deltas = inputs.deltas(name)
        gram = torch.tensor([[inner(a, b) for b in deltas] for a in deltas], dtype=DECOMPOSITION_DTYPE)
        dots += gram
        layer_dots[layer_of(name)] += gram
        decompositions = [left_spectrum(d) for d in deltas]
        for _, S in decompositions:
            for share, value in _top_energy_shares(S, min(deltas[0].shape)).items():
                energy[layer_of(name)][share].append(value)
        k = min([SUBSPACE_DIRECTIONS] + [S.numel() for _, S in decompositions])
        for a, b in pairs:
            if k > 0:
                subspace[f"{labels[a]} & {labels[b]}"].append(
                    [subspace_similarity(decompositions[a][0], decompositions[b][0], i, i) for i in range(1, k + 1)]
                )
        if name == showcase:
            spectra = _showcase_spectra(name, deltas, decompositions, labels, k)

    return {
        "models": inputs.names,
        "labels": labels,
        "base": base,
        "weights": len(inputs.weight_names),
        "cosine_global": _cosine(dots),
        "cosine_per_layer": {layer: _cosine(m) for layer, m in sorted(layer_dots.items(), key=_layer_key)},
        "energy_top_share_per_layer": {
            layer: {share: sum(v) / len(v) for share, v in shares.items()}
            for layer, shares in sorted(energy.items(), key=_layer_key)
        },
        "subspace_similarity": {
            pair: [sum(column) / len(column) for column in zip(*rows)] if rows else []
            for pair, rows in subspace.items()
        },
        "spectra": spectra,
    }


def _top_energy_shares(S: torch.Tensor, full_rank: int) -> Dict[str, float]:
    """The share of sum S^2 in the top 10%, 25% and 50% of ``full_rank`` directions
    (``S``: singular values, descending)."""
    total = float((S**2).sum())
    return {
        f"{int(100 * share)}%": float((S[: max(1, math.ceil(share * full_rank))] ** 2).sum()) / total
        if total > 0
        else 1.0
        for share in TOP_SHARES
    }


def _layer_key(item):
    layer = item[0]
    return (0, int(layer)) if layer.isdigit() else (1, 0)


def _plot(result: dict, out: Path) -> None:
    """cosine.png and spectra.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    _plot_cosine(result, out)
    _plot_spectra(result, out)


def _plot_cosine(result: dict, out: Path) -> None:
    """cosine.png: the seeds' cosine similarity over all weights, then per layer and seed pair."""
    import matplotlib.pyplot as plt

    labels = result["labels"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    image = axes[0].imshow(result["cosine_global"], vmin=-1, vmax=1, cmap="coolwarm")
    _numbers_in_cells(axes[0], result["cosine_global"])
    axes[0].set_xticks(range(len(labels)), labels)
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].set_title("cosine similarity of seed deltas (all weights)")
    figure.colorbar(image, ax=axes[0])
    layers = list(result["cosine_per_layer"])
    count = len(labels)
    pair_names = [f"{labels[a]} & {labels[b]}" for a in range(count) for b in range(a + 1, count)]
    grid = [
        [result["cosine_per_layer"][layer][a][b] for a in range(count) for b in range(a + 1, count)]
        for layer in layers
    ]
    image = axes[1].imshow(grid, vmin=-1, vmax=1, cmap="coolwarm", aspect="auto")
    if len(grid) * len(pair_names) <= 80:  # beyond that the numbers would not fit their cells
        _numbers_in_cells(axes[1], grid)
    axes[1].set_xticks(range(len(pair_names)), pair_names, rotation=20, ha="right", fontsize=8)
    axes[1].set_yticks(range(len(layers)), layers)
    axes[1].set_xlabel("seed pair")
    axes[1].set_ylabel("layer")
    axes[1].set_title("per layer")
    figure.colorbar(image, ax=axes[1])
    figure.tight_layout()
    figure.savefig(staged_path(out / "cosine.png"), dpi=110)
    plt.close(figure)


def _numbers_in_cells(axis, matrix: List[List[float]]) -> None:
    """Each cell's value written in it (two decimals), dark on light cells and light on dark ones."""
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            color = "white" if abs(value) > 0.6 else "black"
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)


def _plot_spectra(result: dict, out: Path) -> None:
    """spectra.png: one weight's singular values, the energy in the top directions per layer,
    and SeRA's Eq. 4 subspace similarity."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    spectra = result["spectra"]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for seed, values in spectra["seeds"].items():
        axes[0].semilogy(range(1, len(values) + 1), values, label=seed)
    merged = spectra["seedft_merge"]
    axes[0].semilogy(range(1, len(merged) + 1), merged, "k--", label="SeedFT merge")
    axes[0].set_title(f"singular values: {spectra['weight']}", fontsize=8)
    axes[0].legend(fontsize=7)
    for share in next(iter(result["energy_top_share_per_layer"].values())):
        axes[1].plot(
            list(result["energy_top_share_per_layer"]),
            [v[share] for v in result["energy_top_share_per_layer"].values()],
            marker="o",
            label=f"top {share}",
        )
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title(
        "energy share of the top directions, per layer"
        + (
            "\n(1.0 everywhere: each delta's rank is below the smallest share, as for adapters)"
            if _all_energy_in_top(result)
            else ""
        ),
        fontsize=9,
    )
    axes[1].set_xlabel("layer")
    axes[1].legend(fontsize=7)
    for pair, values in result["subspace_similarity"].items():
        axes[2].plot(range(1, len(values) + 1), values, marker="o", label=pair)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("SeRA Eq. 4 similarity phi(i, i)")
    axes[2].set_xlabel("i (leading directions)")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(staged_path(out / "spectra.png"), dpi=110)
    plt.close(figure)


def _pairs(matrix: List[List[float]]) -> List[float]:
    """One similarity matrix's values for each pair of seeds (above the diagonal)."""
    return [matrix[a][b] for a in range(len(matrix)) for b in range(a + 1, len(matrix))]


def _pair_mean(matrix: List[List[float]]) -> float:
    """The mean cosine over the seed pairs of one similarity matrix."""
    pairs = _pairs(matrix)
    return sum(pairs) / len(pairs)


def _all_energy_in_top(result: dict) -> bool:
    return all(
        value >= 1 - 1e-9 for shares in result["energy_top_share_per_layer"].values() for value in shares.values()
    )


def _summary(result: dict) -> str:
    count = len(result["models"])
    off_diagonal = _pairs(result["cosine_global"])
    layers = {layer: _pair_mean(matrix) for layer, matrix in result["cosine_per_layer"].items() if layer != "other"}
    lines = [
        "# Seed analysis",
        "",
        f"{count} seeds ({', '.join(result['labels'])}), {result['weights']} 2-D weights"
        + (f", base {result['base']}" if result["base"] else "")
        + ".",
        "",
    ]
    if layers:
        lines.append(
            f"- Cosine similarity of the seed deltas per transformer layer: {min(layers.values()):.3f} to "
            f"{max(layers.values()):.3f} "
            "(mean over seed pairs; embeddings and head apart, under `other`)."
        )
    lines.append(
        f"- Over all weights at once: mean {sum(off_diagonal) / len(off_diagonal):.3f} (min {min(off_diagonal):.3f}, "
        f"max {max(off_diagonal):.3f}); the largest tensors (often the embeddings and the head) dominate it."
    )
    shares = {}
    for layer_values in result["energy_top_share_per_layer"].values():
        for share, value in layer_values.items():
            shares.setdefault(share, []).append(value)
    lines.append(
        "- Energy in the top singular directions (mean over layers): "
        + ", ".join(f"top {s}: {sum(v) / len(v):.3f}" for s, v in shares.items())
        + (
            " (every delta's rank is below the smallest share, as for adapters: this says nothing more)."
            if _all_energy_in_top(result)
            else "."
        )
    )
    for pair, values in result["subspace_similarity"].items():
        if values:
            lines.append(
                f"- Subspace similarity (SeRA Eq. 4) of {pair}: phi(1,1) {values[0]:.3f}, "
                f"phi({len(values)},{len(values)}) {values[-1]:.3f}."
            )
    lines += [
        "",
        "Plots: `cosine.png` (similarity, global and per layer), `spectra.png` (spectra, energy, subspaces).",
    ]
    return "\n".join(lines) + "\n"
