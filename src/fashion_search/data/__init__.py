"""Datasets: safe image loading, the Fashion-IQ layout, the synthetic generator, downloads."""
