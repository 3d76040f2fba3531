"""Launchers: SLURM jobs through submitit (`cap submit`). The core never imports this package."""
