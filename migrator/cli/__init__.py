"""The command line: thin typer commands over the runner and the reports."""
