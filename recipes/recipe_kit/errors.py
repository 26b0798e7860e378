"""The error the recipes raise for bad input, before any training and before writing to ``output_dir``.

Example:
    >>> raise RecipeError("unknown task 'foo'")
    Traceback (most recent call last):
    ...
    recipe_kit.errors.RecipeError: unknown task 'foo'
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class RecipeError(ValueError):
    """Bad input (task, columns, labels, data source, batch settings); the message says how to fix it."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run a recipe's ``main``; a `RecipeError` prints ``error: ...`` and exits with status 2 (no traceback)."""
    try:
        main()
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
