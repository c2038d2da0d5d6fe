"""Access to the YAML data shipped inside the package (model facts, rules, engine tables).

Why one helper: every table the package reads is package data, so it must be found the same way
from a source checkout, an installed wheel or an xdist worker — through ``importlib.resources``.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

import yaml


@lru_cache(maxsize=None)
def load_yaml(name: str) -> Any:
    """Parse ``pytest_moe/data/<name>`` once per process."""
    text = resources.files("pytest_moe").joinpath("data", name).read_text(encoding="utf-8")
    return yaml.safe_load(text)
