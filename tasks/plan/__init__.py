"""Planning: size the run (memory model, flavor catalogue, speed choices), choose where it
runs, and price it. One direction: a workload is sized, then priced; nothing imports back up."""
