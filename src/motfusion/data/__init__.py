"""Datasets: the built-in procedural shapes world."""
