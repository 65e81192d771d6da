"""The command-line tools. `python -m flows.<tool>` is each one's door (flows/approve.py,
status.py, ...); the code lives here, below the flows, and takes the flow it drives as an argument."""
