"""Active generalized category discovery (``active_gcd``; Ma et al., CVPR 2024): GCD with a labelling budget.

The data, classes and splits are those of the ``gcd`` scenario (:mod:`openworld.scenarios.discovery`, same
parameters), plus ``rounds`` (R) and ``budget`` (b, labels per round). The scenario yields R + 1 sessions on the
same D_L / D_U: session 0 is plain GCD (no query allowed); in session r ≥ 1 the strategy may ask for the true
labels of at most b rows of ``session.unlabeled`` through ``session.info["label_query"]``, a :class:`LabelQuery`.
That handle is the only path by which a hidden label reaches a strategy: ``Session.visible()`` still hides every
D_U target (-1), the eval sets stay with the runner, and the handle

* answers only the rows asked for (``labels = query(rows)``, rows = positions in ``session.unlabeled``);
* is budgeted: asking beyond ``budget`` rows in a round, a row asked before (this or an earlier round), or
  after the round ended (the handle is closed when the next session is built) raises :class:`QueryError`;
* is logged: :meth:`LabelQuery.record` (rows in asking order, round, budget, cumulative count) is written by
  the runner into ``results.json`` as ``sessions[r].queries``.

Each session is scored like the ``gcd`` one (``unlabelled`` = all of D_U, queried rows included, as the official
code does; ``test``), so ``sessions[r]`` holds All/Old/New after r·b queried labels: the curve of the paper.
``session.info`` adds ``round``, ``budget``, ``num_queried_before`` (labels revealed in earlier rounds).
The kind stays ``gcd`` (its metrics, headlines and tables); a GCD strategy that never queries simply retrains.
Resume: a resumed run restarts the exclusion set at the first round it re-runs (the per-round budget holds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from openworld.params import NonNegInt, PosInt, Seed32
from openworld.registry import register_scenario
from openworld.scenarios.base import Scenario, Session
from openworld.scenarios.discovery import GCDScenario, LabFraction, ValFraction

PosRounds = Annotated[int, Field(strict=True, ge=1)]
PosBudget = Annotated[int, Field(strict=True, ge=1)]


class QueryError(RuntimeError):
    """A label query the protocol does not allow (over budget, repeated row, closed round, bad rows)."""


class LabelQuery:
    """The budgeted, logged label oracle of one round (see the module docstring).

    ``query(rows)`` → LongTensor of the true labels (scenario ids) of ``rows`` (positions in
    ``session.unlabeled``), in the order asked. Several calls per round are allowed while the budget lasts.
    """

    __slots__ = ("_labels", "_excluded", "_asked", "_closed", "round", "budget", "num_queried_before")

    def __init__(self, labels: torch.Tensor, budget: int, round_index: int, excluded: set[int]):
        self._labels = labels  # held by the scenario side; never returned except row by row
        self._excluded = excluded  # rows revealed in earlier rounds (shared set, grown on close)
        self._asked: list[int] = []
        self._closed = False
        self.round = int(round_index)
        self.budget = int(budget)
        self.num_queried_before = len(excluded)

    @property
    def used(self) -> int:
        return len(self._asked)

    @property
    def remaining(self) -> int:
        return self.budget - len(self._asked)

    def __call__(self, rows) -> torch.Tensor:
        if self._closed:
            raise QueryError(f"label query of round {self.round} is closed (the round is over)")
        idx = torch.as_tensor(np.asarray(rows), dtype=torch.long).reshape(-1)
        n = len(self._labels)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise QueryError(f"label query: rows must lie in 0…{n - 1} (positions in session.unlabeled)")
        asked = idx.tolist()
        if len(set(asked)) != len(asked):
            raise QueryError("label query: a row is asked twice in one call")
        again = sorted(set(asked) & (self._excluded | set(self._asked)))
        if again:
            raise QueryError(f"label query: rows {again[:5]} were already queried")
        if len(asked) > self.remaining:
            raise QueryError(
                f"label query over budget: round {self.round} allows {self.budget} labels, {self.used} used, "
                f"{len(asked)} asked"
            )
        self._asked.extend(asked)
        return self._labels[idx].clone()

    def close(self) -> None:
        """End the round: later calls raise; its rows join the exclusion set of later rounds."""
        if not self._closed:
            self._excluded.update(self._asked)
            self._closed = True

    def record(self) -> dict:
        """What ``results.json`` keeps: round, budget, rows in asking order, cumulative labels revealed."""
        return {
            "round": self.round,
            "budget": self.budget,
            "indices": list(self._asked),
            "num_queried": len(self._asked),
            "num_queried_total": self.num_queried_before + len(self._asked),
        }

    def __repr__(self) -> str:  # no labels in any printed form
        return f"LabelQuery(round={self.round}, budget={self.budget}, used={self.used})"

    def __reduce__(self):
        raise TypeError("LabelQuery cannot be pickled or copied (it holds hidden labels)")


@register_scenario("active_gcd")
class ActiveGCDScenario(GCDScenario):
    """The ``gcd`` scenario in R + 1 rounds with a budget of b labels per round (module docstring).

    Parameters: those of ``gcd`` plus ``rounds`` (R ≥ 1, query rounds after round 0) and ``budget`` (b ≥ 1).
    """

    kind = "gcd"

    def __init__(
        self,
        *,
        rounds: PosRounds = 3,
        budget: PosBudget = 100,
        data: dict | None = None,
        old_classes: PosInt | Sequence[NonNegInt] | None = None,
        new_classes: Sequence[NonNegInt] | None = None,
        class_split: str | None = None,
        p_lab: LabFraction = 0.5,
        split_seed: Seed32 = 0,
        labelled_val_frac: ValFraction = 0.0,
        k_mode: Literal["known", "estimated"] = "known",
        variants: Sequence[Literal["v2", "v2b", "v1"]] = (),
        inductive_mapping: Literal["own", "from_transductive"] = "own",
        train_subsample: PosInt | None = None,
        test_subsample: PosInt | None = None,
        seed: int = 0,
    ):  # the gcd parameters spelled out: recipe validation reads this signature
        super().__init__(
            data=data, old_classes=old_classes, new_classes=new_classes, class_split=class_split, p_lab=p_lab,
            split_seed=split_seed, labelled_val_frac=labelled_val_frac, k_mode=k_mode, variants=variants,
            inductive_mapping=inductive_mapping, train_subsample=train_subsample, test_subsample=test_subsample,
            seed=seed,
        )
        self.rounds = rounds
        self.budget = budget

    def _validate_params(self) -> None:
        for name in ("rounds", "budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"scenario.{name}: a positive integer is required, got {value!r}")
        super()._validate_params()

    @property
    def num_sessions(self) -> int:
        return self.rounds + 1

    def sessions(self) -> Iterator[Session]:
        base = GCDScenario.session(self, 0)
        labels = base.unlabeled.targets.clone()  # the hidden D_U labels: only the handles hold them
        if self.rounds * self.budget > len(labels):
            raise ValueError(
                f"scenario: rounds·budget = {self.rounds * self.budget} exceeds |D_U| = {len(labels)}"
            )
        excluded: set[int] = set()  # per sessions() call: every run starts with nothing revealed
        previous: LabelQuery | None = None
        for r in range(self.rounds + 1):
            if previous is not None:
                previous.close()  # the runner asks for session r only after evaluating r - 1
            handle = LabelQuery(labels, self.budget if r > 0 else 0, r, excluded)
            previous = handle
            info = {
                **base.info,
                "round": r,
                "budget": handle.budget,
                "num_queried_before": handle.num_queried_before,
                "label_query": handle,
            }
            yield replace(base, index=r, name=f"round_{r}", info=info)
        if previous is not None:
            previous.close()

    def session(self, index: int) -> Session:
        if not 0 <= index <= self.rounds:
            raise IndexError(f"scenario has {self.num_sessions} sessions, asked for {index}")
        return Scenario.session(self, index)

    def describe(self) -> dict:
        out = super().describe()
        out["rounds"], out["budget"] = self.rounds, self.budget
        return out


def query_records(sessions: Sequence[Session]) -> list[dict]:
    """The query logs of sessions (for tests and tools): ``[handle.record()]`` in session order."""
    return [s.info["label_query"].record() for s in sessions if "label_query" in s.info]
