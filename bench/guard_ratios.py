"""Record the guard ratios of a v2 policy trained before they were kept (the shipped ones were).

A v2 policy plans between its trained settings from the schedules of the settings around it, and only where the
guard found those clearly better than uniform (``NoiseLevelPolicy._between``). ``train_noise_level`` now records each
trained (T, shift, k) with its guard MSE ratio learned / uniform. This reruns that same guard (``guard_settings``:
the same pairs, schedules and rule) on the policy's training settings, checks that it gives the fallback list the
policy has, and writes the ratios into its ``config.json`` (the weights are not touched).

    .venv/bin/python bench/guard_ratios.py recache/policies/pretrained/mnist-dit-taylorseer
    .venv/bin/python bench/guard_ratios.py recache/policies/pretrained/mnist-flux-taylorseer --pipeline mnist-flux
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from recache.policies import load_policy
from recache.policies.expert_iteration import ExpertConfig
from recache.policies.expert_training import _settings, guard_settings
from recache.sampling.diffusers_rollouts import load_rollouts
from recache.sampling.pipeline import DigitPipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("policy", help="a v2 policy folder")
    p.add_argument("--pipeline", default=None, help="the diffusers pipeline it was trained on (mnist-flux)")
    args = p.parse_args()
    folder = Path(args.policy)
    policy = load_policy(folder)
    trained = policy.config.training
    config = ExpertConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in trained.items()
                             if k in ExpertConfig.__dataclass_fields__})
    pipe = DigitPipeline.from_pretrained() if args.pipeline is None else load_rollouts(args.pipeline)
    if pipe.guidance != trained["guidance"]:
        raise SystemExit(f"the policy was trained at guidance {trained['guidance']}, the sampler runs {pipe.guidance}")
    with tempfile.TemporaryDirectory() as scratch:
        fallback, ratios = guard_settings(policy, _settings(config, pipe), config, Path(scratch))
    if fallback != policy.config.fallback:
        raise SystemExit(f"the guard now gives fallback {fallback}, the policy has {policy.config.fallback}")
    policy.config = replace(policy.config, guard_ratios=ratios)
    policy.save_pretrained(folder)
    print(f"{folder}: {len(ratios)} guard ratios recorded; fallback unchanged ({len(fallback)})")


if __name__ == "__main__":
    main()
