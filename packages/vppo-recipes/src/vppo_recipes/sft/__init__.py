"""The SFT recipe (`sft_distributed.py`), run as a module of the installed package."""
