"""Evaluation: every suite behind one registry (suites.py), the metrics they compute, and the small
judge models they use (a Fashion-MNIST classifier, a CLIP)."""
