"""The `evaluate` metric module for inappropriate probability: `evaluate.load(safety_dpo.evaluation.ip_metric_path())`."""

from pathlib import Path


def ip_metric_path() -> str:
    """The path of the metric script, for `evaluate.load(...)`."""
    return str(Path(__file__).with_name("inappropriate_probability.py"))
