"""lm-evaluation-harness integration: the ``aoe`` model, offline tasks, eval suites and ``aoe eval``.

Importing ``aoe_lightning.evaluation.adapter`` registers the ``aoe`` model with lm-eval.
"""
