"""What runs on the training side, and the embedded defaults: the training script template and
its sibling files, the built-in reward functions, the tiny model and the shipped example data.
Imports nothing from the engine: the generated script must run without it."""
