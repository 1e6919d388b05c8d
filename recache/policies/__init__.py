"""Schedule policies: given a budget k, return the schedule of k full passes.

``NoiseLevelPolicy`` (ReCache v2: learned, one policy for every budget, step count and sigma grid;
``noise_level.py``) learns by ``expert_iteration.py`` in a run of ``expert_training.py``; ``ReCachePolicy`` (v1, one
T and grid; ``recache.py``) by REINFORCE, ``reinforce.py``, in a run of ``training.py``; ``load_policy`` reads
either; ``budcache.py`` searches one schedule per budget and ``alignment.py`` fits its sigma grid;
``path_planning.py`` plans every budget exactly on a cost table that ``cost_table.py`` measures; ``heuristics/`` are
the threshold baselines. ``Schedule.uniform`` is the baseline. Policy folders are read and written by
``pretrained.py``; trained policies ship in ``pretrained/<model>-<mechanism>``.
"""

from recache.policies.noise_level import NoiseLevelConfig, NoiseLevelPolicy, load_policy
from recache.policies.pretrained import shipped_policies
from recache.policies.recache import ReCacheConfig, ReCachePolicy

__all__ = ["NoiseLevelConfig", "NoiseLevelPolicy", "ReCacheConfig", "ReCachePolicy", "load_policy", "shipped_policies"]
