"""Reports: the report.json schema and its renderers (terminal, HTML); never live processes."""
