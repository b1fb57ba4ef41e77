"""Commands that are not DVC stages: named experiments, seed 002's ablations, the seed scoreboard,
the generated docs, the DVC remote set-up. Run as ``python -m stages.<name>`` (see
``stages.COMMANDS``); they sit above the stages and the task packages and import from them.
"""
