"""The error the recipes raise for bad input, before any training and before writing to ``output_dir``.

Example:
    >>> raise RecipeError("unknown task 'foo'")
    Traceback (most recent call last):
    ...
    recipe_kit.errors.RecipeError: unknown task 'foo'
"""

from __future__ import annotations


class RecipeError(ValueError):
    """Bad input (task, columns, labels, data source, batch settings); the message says how to fix it."""
