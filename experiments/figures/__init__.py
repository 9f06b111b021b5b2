"""Figures of the study binaries, one module per study (drawn from results.json alone)."""
