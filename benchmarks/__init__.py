"""Timing scripts for bpjax: each prints a table and can write its results as JSON."""
