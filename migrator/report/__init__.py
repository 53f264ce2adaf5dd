"""Reports: renderers of the report.json model (terminal, HTML); never live processes."""
