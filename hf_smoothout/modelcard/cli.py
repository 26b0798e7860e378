"""The model-card command line: ``python -m hf_smoothout.modelcard OUTPUT_DIR [--compare_to DIR] [--print_table]``."""

from __future__ import annotations

import argparse
import sys

from .card import write_model_card
from .runinfo import read_run
from .tables import comparison_table


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_smoothout.modelcard OUTPUT_DIR [--compare_to DIR] [--print_table]``."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_smoothout.modelcard",
        description="(Re)write the model card README.md of a SmoothOut run, e.g. after running the analysis tools.",
    )
    parser.add_argument("output_dir", help="the run's output_dir (holds smoothout_run.json and all_results.json)")
    parser.add_argument("--compare_to", help="output_dir of a baseline run to compare with")
    parser.add_argument("--print_table", action="store_true", help="also print the comparison table")
    parser.add_argument("--no_card", action="store_true", help="do not write README.md (with --print_table)")
    options = parser.parse_args(argv)
    try:
        if not options.no_card:
            path = write_model_card(options.output_dir, compare_to=options.compare_to)
            print(f"model card: {path}")
        if options.print_table:
            baseline = options.compare_to or (read_run(options.output_dir)[0].get("compare_to"))
            if not baseline:
                parser.error("--print_table needs --compare_to (or a run that recorded compare_to)")
            print(comparison_table(options.output_dir, baseline), end="")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
