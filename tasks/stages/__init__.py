"""The Prefect layer: each lifecycle stage as a task around a plain function of a phase
(`stage.py` calls the plain function outside a flow run), the run's record of outcomes, result
caching by key, approval pauses and artifacts."""
