"""The report: the plan and the run's summary as markdown and text (report.md, the CLI, the
Prefect artifacts), and a recipe's chain."""
