"""Recall@K metrics and the Fashion-IQ evaluation protocol."""
