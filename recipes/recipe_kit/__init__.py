"""Helpers shared by the recipes in ``recipes/`` (not part of the installed ``hf_smoothout`` package).

Each module has one job: `errors` (the error type for bad input), `offline` (where the offline data
and model sources live), `batching` (effective batch and learning-rate scaling), `arguments`
(options both recipes share), `text_data` / `image_data` (loading and checking data) and
`outputs` (what a finished run writes).
"""
