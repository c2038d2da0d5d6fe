"""The run history: every night's results in a database, judged against earlier nights, reported.

``store`` (schema, migrations, reads/writes) ← ``rows`` (entry → rows + provenance) ← ``plugin`` (pytest
glue); ``regress`` judges; ``html`` renders the morning report; ``imports`` loads old results files;
``merge`` joins the results directories of one night's jobs.
"""
