"""The RL recipe, `rl_distributed.py`: VPPO / PGPO / DAPO / GRPO and PAPO / CFPO / DVRP / ToR / PEPO /
CGPO / VEPO with FSDP2, launched with `tune run`.

Nothing is imported here on purpose: `tune run vppo_recipes/rl/rl_distributed.py` executes the recipe module with
`python -m`, and a package that imported it first would make runpy warn and load it twice. The folder is not
named `recipes/` because torchtune's own top-level `recipes` package would shadow it.
"""
