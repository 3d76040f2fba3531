"""Launchers: SLURM jobs through submitit (`cap submit`). The core never imports this package, and this package
never imports cap.cli: its jobs call the engine (`run`, `resume`) and the sweeps (`run_sweep`) directly."""

EXIT_PREEMPTED = 75
"""EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1/SIGUSR2 after writing a checkpoint; run again with --resume
(`cap train`'s exit status, and a TrainJob's when it leaves to be requeued)"""
