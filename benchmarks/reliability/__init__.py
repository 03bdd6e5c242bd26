"""Hostile and bad-input sweep of the command line (issue 34): see sweep.py."""
