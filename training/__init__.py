"""Offline training: interaction files -> sparse matrix -> split -> train -> model version."""
