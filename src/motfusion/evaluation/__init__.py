"""Evaluation: scene checker and GenEval-style metrics for the shapes world."""
