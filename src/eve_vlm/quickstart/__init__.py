"""Offline quickstart: real small weights and data that install from package registries."""
