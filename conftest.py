"""Root conftest: the plugin's own tests drive pytest in a subprocess with ``pytester``.

The pytest-moe plugin itself is registered by its ``pytest11`` entry point (``pip install -e .``),
so it is not listed here (listing it too would register it twice).
"""

pytest_plugins = ["pytester"]
