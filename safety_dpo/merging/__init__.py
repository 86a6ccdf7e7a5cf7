"""Merging safety experts into one adapter: Co-Merge and the linear/TIES/DARE baselines."""
