"""Co-Merge: merge per-category safety experts into one adapter (`co_merge`, `CoMergeConfig`, `MergedAdapter`).

`functions` holds the merge maths as pure tensor functions; `experts` loads and checks experts; `calibration`
records activation statistics with forward hooks; `co_merge` puts them together. See docs/merging.md.
"""

from safety_dpo.merging.adapter import MergedAdapter
from safety_dpo.merging.co_merge import co_merge
from safety_dpo.merging.config import CoMergeConfig

__all__ = ["CoMergeConfig", "MergedAdapter", "co_merge"]
