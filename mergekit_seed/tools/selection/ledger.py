"""``select``'s finished work, kept so that an interrupted sweep resumes where it stopped.

Every scoring (a seed or a merge on a split) and every candidate's outcome on validation (its
merge's fingerprint and warnings with its score, or its failure) is one entry of the output
protocol's :class:`~mergekit_seed.output.ResumeJournal` beside OUT, keyed by the sha256 of
everything it depends on:

- the scorer: its metric, stop strings, batch size and device, and the files of its base and
  tokenizer;
- the split: the sha256 of the JSONL file, or lm-eval's tasks, settings and prompts;
- the model: a seed's files (:func:`~mergekit_seed.references.weights.folder_identity`), or a
  candidate's recipe and the files of every input it names.

A changed seed, split or grid point changes exactly the keys of the work that depends on it;
the rest is read back. Without a journal (``select()`` called without one), everything is
computed as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mergekit_seed.output import ResumeJournal
from mergekit_seed.references.hub import local_folder
from mergekit_seed.references.weights import folder_identity


Score = Tuple[float, List[float]]


class Ledger:
    """The sweep's scorings and candidate outcomes, through ``journal`` when there is one."""

    def __init__(self, scorer: Any, inputs: Sequence[str], journal: Optional[ResumeJournal] = None):
        self.scorer = scorer
        self.journal = journal
        self._identities: Dict[str, Dict[str, str]] = {}
        self._inputs = list(inputs)

    @property
    def reused(self) -> int:
        return self.journal.reused if self.journal is not None else 0

    def seed(self, reference: str) -> dict:
        """What a seed is: its files."""
        return {"seed": self._identity(reference)}

    def candidate(self, recipe_source: str) -> dict:
        """What a candidate is: its recipe and the files of the seeds and the base it merges."""
        return {
            "recipe": recipe_source,
            "inputs": {reference: self._identity(reference) for reference in self._inputs},
        }

    def recorded(self, model: dict, split: Any) -> Optional[Score]:
        """The scoring of ``model`` on ``split`` that an interrupted run recorded (None when none)."""
        entry = self.journal.get(self._key(model, split)) if self.journal is not None else None
        if entry is None or not _is_score(entry):
            return None
        return float(entry["score"]), [float(value) for value in entry["values"]]

    def keep(self, model: dict, split: Any, score: Score) -> None:
        """Record the scoring of ``model`` on ``split``."""
        if self.journal is not None:
            figure, values = score
            self.journal.put(self._key(model, split), {"score": figure, "values": values})

    def outcome(self, model: dict, split: Any) -> Optional[dict]:
        """A candidate's recorded outcome on ``split`` (None when there is none)."""
        if self.journal is None:
            return None
        return self.journal.get(self._key({"outcome": model}, split))

    def record(self, model: dict, split: Any, outcome: dict) -> None:
        if self.journal is not None:
            self.journal.put(self._key({"outcome": model}, split), outcome)

    def _identity(self, reference: Optional[str]) -> Optional[Dict[str, str]]:
        if reference is None:
            return None
        if reference not in self._identities:
            self._identities[reference] = folder_identity(local_folder(reference))
        return self._identities[reference]

    def _key(self, model: dict, split: Any) -> str:
        scorer = dataclasses.asdict(self.scorer)
        scorer.pop("share_base", None)  # how the base is loaded does not change a score
        for name in ("base", "tokenizer"):
            scorer[name] = [scorer.get(name), self._identity(scorer.get(name))]
        record = split.record()
        split_identity = {key: value for key, value in record.items() if key not in ("name", "path")}
        material = {"scorer": scorer, "split": split_identity, "kind": split.kind, "model": model}
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _is_score(entry: dict) -> bool:
    values = entry.get("values")
    return isinstance(entry.get("score"), (int, float)) and isinstance(values, list)
