"""Evaluation: inappropriate probability, FID, CLIPScore and the benchmark runner."""
