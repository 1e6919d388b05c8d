"""Schedule policies: given a budget k, return the schedule of k full passes.

``ReCachePolicy`` (learned, one policy for every budget; ``recache.py``) is trained by ``reinforce.py``;
``Schedule.uniform`` is the baseline. Trained policies ship in ``pretrained/<model>-<mechanism>``.
"""

from recache.policies.recache import ReCacheConfig, ReCachePolicy, shipped_policies

__all__ = ["ReCacheConfig", "ReCachePolicy", "shipped_policies"]
