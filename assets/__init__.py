"""Thin Dagster assets and asset checks, one module per stage; they hand each other paths."""
