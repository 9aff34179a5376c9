"""Imported by every Python process started with this directory on PYTHONPATH (see
tests/fault_hooks.py): installs the faults the environment asks for into the trainer."""

from tests.fault_hooks import install

install()
