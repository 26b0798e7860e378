"""What a study's runs cost: interleaved wall-time benchmarks, ``cost.json``, and time estimates for a plan.

* :data:`COST_NOTE` -- the caveat every cost measurement carries.
* :func:`interleaved_seconds` -- times every arm once per round, round-robin, so a change in machine load
  spreads over all arms instead of inflating one.
* :func:`benchmark` -- those timings as ``cost.json``: per arm the median and its ratio to a reference arm, with
  the load average before and after.
* :func:`write_json_atomically`, :func:`read_cost` -- ``cost.json`` written whole or not at all, and read back.
* :func:`cost_column_note` -- the report's line on where the cost column comes from.
* :func:`epoch_seconds_estimate` -- seconds per epoch of an arm for a plan: its finished runs, similar arms'
  runs, ``cost.json``, else a default.
* :class:`Plan` -- the runs still to do with their estimated seconds, as the text ``--stage plan`` prints.

Example:
    >>> seconds = interleaved_seconds(["ghost", "sam"], 2, lambda arm, r: {"ghost": 5.0, "sam": 10.0}[arm], "s")
    cost round 1/2 ghost: 5.00 s
    cost round 1/2 sam: 10.00 s
    cost round 2/2 ghost: 5.00 s
    cost round 2/2 sam: 10.00 s
    >>> seconds["sam"]
    [10.0, 10.0]
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import table_lines

COST_NOTE = (
    "Cost measurements are only valid when nothing else runs on the machine (other processes share the cores "
    "and inflate some arms more than others)."
)


def interleaved_seconds(
    arms: list[str], rounds: int, seconds_of: Callable[[str, int], float], unit: str = "s/epoch"
) -> dict[str, list[float]]:
    """``{arm: [seconds per round]}`` from ``seconds_of(arm, round)``, arm after arm within every round; each
    measurement is printed (``cost round 1/3 ghost: 5.52 s/epoch``)."""
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    for round_index in range(rounds):
        for arm in arms:
            seconds[arm].append(seconds_of(arm, round_index))
            print(f"cost round {round_index + 1}/{rounds} {arm}: {seconds[arm][-1]:.2f} {unit}")
    return seconds


def benchmark(
    path: Path,
    arms: list[str],
    rounds: int,
    seconds_of: Callable[[str, int], float],
    describe: Callable[[str], dict[str, Any]],
    reference: str,
    facts: dict[str, Any],
) -> dict[str, Any]:
    """Time ``arms`` with :func:`interleaved_seconds` and write the result to ``path`` (``cost.json``): the run's
    ``facts`` (e.g. threads, examples), the load average before and after, and per arm ``describe(arm)`` with
    the seconds of every round, their median and its ratio to ``reference``'s median. Prints a summary.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "cost.json"
        >>> result = benchmark(path, ["ghost", "sam"], 1, lambda arm, r: {"ghost": 4.0, "sam": 8.0}[arm],
        ...                    lambda arm: {}, "ghost", {})  # doctest: +ELLIPSIS
        cost round 1/1 ghost: 4.00 s/epoch
        ...
        sam                      8.00 s/epoch  x2.00 of ghost
        Cost measurements are only valid ...
        >>> read_cost(path)["arms"]["sam"]["ratio_to_ghost"]
        2.0
    """
    load_before = os.getloadavg()
    seconds = interleaved_seconds(arms, rounds, seconds_of)
    median = {arm: statistics.median(seconds[arm]) for arm in arms}
    ratio = f"ratio_to_{reference}"
    result = {
        "note": COST_NOTE,
        "reference_arm": reference,
        "rounds": rounds,
        **facts,
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "arms": {
            arm: {
                **describe(arm),
                "per_epoch_s": seconds[arm],
                "median_s": median[arm],
                ratio: median[arm] / median[reference],
            }
            for arm in arms
        },
    }
    write_json_atomically(path, result)
    for arm, entry in result["arms"].items():
        print(f"{arm:20s} {entry['median_s']:8.2f} s/epoch  x{entry[ratio]:.2f} of {reference}")
    print(COST_NOTE, flush=True)
    return result


def write_json_atomically(path: Path, data: Any) -> None:
    """``data`` as indented JSON in ``path``, through a temporary file renamed over it (never half written).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "cost.json"
        >>> write_json_atomically(path, {"rounds": 3})
        >>> read_cost(path)
        {'rounds': 3}
    """
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_cost(path: Path) -> dict[str, Any] | None:
    """The benchmark in ``path`` (``cost.json``), or None when there is none yet."""
    return json.loads(path.read_text()) if path.is_file() else None


def cost_column_note(cost: dict[str, Any] | None, reference: str, reference_label: str) -> str:
    """The report's line under a table with a cost column (ratios to ``reference`` from ``cost.json``).

    Example:
        >>> cost_column_note(None, "ghost", "ghost baseline")
        '- cost column: no cost.json yet (run `--stage cost` on an otherwise idle machine).'
    """
    if cost is None:
        return "- cost column: no cost.json yet (run `--stage cost` on an otherwise idle machine)."
    before, after = ([round(x, 2) for x in cost[k]] for k in ("loadavg_before", "loadavg_after"))
    return (
        f"- cost column: median per-epoch wall time over {cost['rounds']} interleaved rounds relative to the "
        f"{reference_label} in the same benchmark ({cost['arms'][reference]['median_s']:.2f} s/epoch); load average "
        f"before/after {before} / {after}. {COST_NOTE}"
    )


def epoch_seconds_estimate(
    runs: dict[str, dict[str, Any]],
    arm: str,
    similar: Callable[[str], bool],
    cost: dict[str, Any] | None,
    default: float,
) -> tuple[float, str]:
    """Seconds per training epoch (evaluations included) of ``arm`` and where the number comes from: the median
    of its finished runs, else of the runs of arms that ``similar`` accepts, else ``cost.json``, else ``default``.

    Example:
        >>> runs = {"a": {"arm": "ghost", "train_runtime_s": 300.0, "epochs": 50.0}}
        >>> epoch_seconds_estimate(runs, "ghost", lambda arm: False, None, 5.8)
        (6.0, 'measured (1 runs)')
        >>> epoch_seconds_estimate(runs, "sam", lambda arm: False, None, 11.7)
        (11.7, 'pilot default')
    """
    own = [r["train_runtime_s"] / r["epochs"] for r in runs.values() if r["arm"] == arm and r["epochs"]]
    if own:
        return statistics.median(own), f"measured ({len(own)} runs)"
    same = [r["train_runtime_s"] / r["epochs"] for r in runs.values() if similar(r["arm"]) and r["epochs"]]
    if same:
        return statistics.median(same), f"measured on similar arms ({len(same)} runs)"
    entry = None if cost is None else cost["arms"].get(arm)
    if entry is not None:
        return entry["median_s"], "cost.json"
    return default, "pilot default"


@dataclass
class Plan:
    """The runs still to do, stage by stage, with estimated seconds; ``possible_extra`` seconds more if unfinished
    sweeps extend their grids.

    Example:
        >>> plan = Plan()
        >>> plan.add("sweep", "sweep-b4096-sam-v0.05-s100", 3600.0, "pilot default")
        >>> print(plan.text("out", finished=0, measure_s=80.0))  # doctest: +NORMALIZE_WHITESPACE
        Plan for out: 1 runs to do (0 finished); v? = value chosen by a sweep that has not finished.
        <BLANKLINE>
        | stage | run | est. s | per-epoch time from |
        |---|---|---|---|
        | sweep | sweep-b4096-sam-v0.05-s100 | 3600 | pilot default |
        <BLANKLINE>
        - sweep: 1.00 h
        - total: 1.00 h, plus up to 0.00 h if unfinished sweeps extend their grids; final runs include 80 s of
          sharpness measurement each.
    """

    rows: list[list[str]] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)
    possible_extra: float = 0.0

    def add(self, stage: str, run: str, seconds: float, source: str) -> None:
        """Run ``run`` of ``stage``, about ``seconds`` long (per-epoch time from ``source``)."""
        self.totals[stage] = self.totals.get(stage, 0.0) + seconds
        self.rows.append([stage, run, f"{seconds:.0f}", source])

    def text(self, output_dir: str, finished: int, measure_s: float) -> str:
        """The plan as printed: the table of runs, the hours per stage and in total."""
        total = sum(self.totals.values())
        lines = [
            f"Plan for {output_dir}: {len(self.rows)} runs to do ({finished} finished); v? = value chosen by a "
            "sweep that has not finished.",
            "",
            *table_lines(["stage", "run", "est. s", "per-epoch time from"], self.rows, "Nothing left to run."),
            "",
            *(f"- {stage}: {seconds / 3600:.2f} h" for stage, seconds in self.totals.items()),
            f"- total: {total / 3600:.2f} h, plus up to {self.possible_extra / 3600:.2f} h if unfinished sweeps "
            f"extend their grids; final runs include {measure_s:.0f} s of sharpness measurement each.",
        ]
        return "\n".join(lines)
