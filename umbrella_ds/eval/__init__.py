"""Evaluation: greedy generation and likelihood scoring (`evaluate`, `eval_batches`), answer
parsing and per-task scoring (`metrics`), statistics (`stats`), the train/eval subject-overlap
refusal (`leakage`) and the ``umbrella-eval`` command (`eval_cli`).

Empty on purpose: training imports `leakage` and `evaluate`, and evaluation imports
`train.inputs`, so nothing is imported here that would tie the two packages' loading together.
"""
