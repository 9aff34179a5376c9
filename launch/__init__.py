"""Launchers: the train entry point, torchrun and SLURM scripts, the quickstart."""
