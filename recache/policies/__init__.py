"""Schedule policies: given a budget k, return the schedule of k full passes.

``ReCachePolicy`` (learned, one policy for every budget; ``recache.py``) learns by ``reinforce.py`` in a run of
``training.py``; ``budcache.py`` searches one schedule per budget and ``alignment.py`` fits its sigma grid;
``path_planning.py`` plans every budget exactly on a cost table that ``cost_table.py`` measures;
``heuristics/`` are the threshold baselines. ``Schedule.uniform`` is the baseline. Policy folders are read and
written by ``pretrained.py``; trained policies ship in ``pretrained/<model>-<mechanism>``.
"""

from recache.policies.pretrained import shipped_policies
from recache.policies.recache import ReCacheConfig, ReCachePolicy

__all__ = ["ReCacheConfig", "ReCachePolicy", "shipped_policies"]
