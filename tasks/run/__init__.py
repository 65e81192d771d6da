"""The run phase: the backends a job runs on (this machine, Hugging Face Jobs, a Prefect work
pool), following a job (progress, budget guard), fetching what it made, and reading a run's
state from its folder."""
