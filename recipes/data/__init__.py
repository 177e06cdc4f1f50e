"""Synthetic reasoning data whose answers are verified by construction."""
