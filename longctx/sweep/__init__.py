"""Length-scaling sweeps: config, plan, cells in child processes, executors (local, Slurm, Ray), results."""
