"""The one definition of the environment that keeps a run of this project offline: no model or dataset hub, no wandb
server, deterministic hashing. The demo, the tests and the benchmarks launch recipes with it; noxfile.py reads this
file too (it has no imports, so nox can load it without the package installed)."""

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
}
