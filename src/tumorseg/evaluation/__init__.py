"""Evaluation: tumour metrics (per image, pooled, the poster's set), the evaluation report, panels."""
