"""Datasets: bundled files and loaders for the formats users already have."""
