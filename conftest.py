"""Repository-wide pytest setup.

Hypothesis draws fresh examples on every run by default, which makes a red CI run unreproducible. Under nox (which
sets ``HYPOTHESIS_PROFILE=ci``) the examples are derived from each test's name instead, so CI sees the same cases
every time; a plain ``pytest`` run keeps exploring new ones.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
