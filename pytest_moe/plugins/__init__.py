"""The pytest plugin objects, one per concern, registered by ``pytest_moe.plugin.pytest_configure``."""
