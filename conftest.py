"""Root conftest: the plugin's own tests drive pytest in a subprocess with ``pytester``.

The pytest-moe plugin itself is registered by its ``pytest11`` entry point (``pip install -e .``),
so it is not listed here (listing it too would register it twice).
"""

import os

pytest_plugins = ["pytester"]

# The plugin's tests run pytest-moe many times over made-up matrices: those nights must never land in the
# user's (or a team's shared) run history. Tests of the history pass --moe-history, which wins over this.
os.environ["PYTEST_MOE_HISTORY"] = "off"
