"""The RL recipe, `rl_distributed.py` (any method of `vppo_recipes.methods`, with FSDP2, launched with `tune run`),
and its phases' modules: `rollouts.py` (sampling, grading, the online filter), `step_metrics.py` (reducing a step's
values over ranks), `validation.py` (held-out avg@k).

Nothing is imported here on purpose: `tune run vppo_recipes/rl/rl_distributed.py` executes the recipe module with
`python -m`, and a package that imported it first would make runpy warn and load it twice. The folder is not
named `recipes/` because torchtune's own top-level `recipes` package would shadow it.
"""
