"""Argument types shared by subcommands: each rejects a bad value with a message naming it and what is allowed."""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from recache.errors import RecacheError
from recache.io import output_target
from recache.mechanisms import DEFAULT_MECHANISM, HOOK_MECHANISMS, MECHANISMS
from recache.policies import NoiseLevelPolicy
from recache.policies import load_policy as load_any_policy
from recache.policies.heuristics import HEURISTICS
from recache.sampling.pipeline import DigitPipeline
from recache.schedule import Schedule, check_budget_form, resolve_budget
from recache.schedule.budget import parse_budget


def _whole_number(minimum: int, maximum: int | None = None):
    allowed = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {allowed}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{value} is not a whole number {allowed}")
        return value

    return parse


positive_int = _whole_number(1)
nonnegative_int = _whole_number(0)
seed_int = _whole_number(0, 2**32 - 1)  # a torch.Generator seed; every sample adds its index to it
batch_int = _whole_number(1, 10_000)  # samples or pairs held in memory at once
BUDGET_HELP = ("full passes: k (10), a fraction of the T steps (0.2) or a speed-up (5x); fractions and speed-ups are "
               "rounded up to whole passes, so the speed-up is at most the one asked for")


def budget_arg(text: str):
    """``--budget``: as the API takes it (``recache.schedule.budget``); resolved against T once the model is known."""
    try:
        budget = parse_budget(text)
        check_budget_form(budget)
    except RecacheError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return budget


def budget_label(budget) -> str:
    """How a budget names an output: ``k10`` for a whole number, the text as typed (``5x``, ``0.2``) otherwise."""
    return f"k{budget}" if isinstance(budget, int) else str(budget)


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def guidance_float(text: str) -> float:
    value = nonnegative_float(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text} is not a CFG scale from 0 to 100")
    return value


def positive_float(text: str) -> float:
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not a number > 0")
    return value


def digit_classes(text: str) -> list[int]:
    """``all`` or a comma-separated list of digits 0-9."""
    if text == "all":
        return list(range(10))
    classes = []
    for part in text.split(","):
        try:
            c = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"class {part!r} is not a digit 0-9 (or use 'all')") from None
        if not 0 <= c <= 9:
            raise argparse.ArgumentTypeError(f"class {c} is outside 0-9")
        classes.append(c)
    return classes


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    return values


def given_options(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The flags among ``names`` (argparse destinations defaulting to None) that the user gave, as typed."""
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def budget_list(text: str) -> list[int]:
    """Comma-separated budgets k, each once."""
    budgets = int_list(text)
    if twice := next((k for k in budgets if budgets.count(k) > 1), None):
        raise argparse.ArgumentTypeError(f"budget k={twice} is given twice")
    return budgets


def mechanism_list(text: str) -> list[str]:
    names = list(MECHANISMS) if text == "all" else text.split(",")
    for name in names:
        if name not in MECHANISMS:
            raise argparse.ArgumentTypeError(f"unknown mechanism {name!r}; "
                                             f"choose from {', '.join(MECHANISMS)} or 'all'")
    return names


def heuristic_list(text: str) -> list[str]:
    names = list(HEURISTICS) if text == "all" else [n for n in text.split(",") if n]
    if not names:
        raise argparse.ArgumentTypeError(f"no heuristic named; choose from {', '.join(HEURISTICS)} or 'all'")
    for name in names:
        if name not in HEURISTICS:
            raise argparse.ArgumentTypeError(f"unknown heuristic {name!r}; "
                                             f"choose from {', '.join(HEURISTICS)} or 'all'")
    return names


def add_model_options(parser: argparse.ArgumentParser,
                      seed_help: str | None = "seed of the initial noise (default: 0)") -> None:
    """``--model``, ``--steps``, ``--guidance``, ``--sigmas`` and, for commands that draw anything from a seed,
    ``--seed`` (``seed_help=None``: the command has none; evaluation uses the protocol's seeds)."""
    parser.add_argument("--model", default="mnist-dit",
                        help="embedded model name or a saved model folder (default: mnist-dit)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="number of sampler steps T (default: the model's own, 50 for mnist-dit)")
    parser.add_argument("--guidance", type=guidance_float, default=None,
                        help="CFG scale, 0 to 100 (default: the model's own)")
    parser.add_argument("--sigmas", default=None,
                        help="sigma grid: linear, shifted (shift 3) or shifted:<shift> (default: the model's own)")
    if seed_help is not None:
        parser.add_argument("--seed", type=seed_int, default=0, help=seed_help)


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    """Train or search on a diffusers pipeline instead of the embedded DiT."""
    parser.add_argument("--pipeline", default=None,
                        help="a diffusers pipeline folder or hub id (offline: already cached), or the shipped "
                             "digit FLUX 'mnist-flux'; replaces --model")
    parser.add_argument("--prompts", default=None,
                        help="with --pipeline: a prompts file, .txt (one per line), .jsonl or .csv")
    parser.add_argument("--height", type=positive_int, default=None,
                        help="with --pipeline: image height (default: the pipeline's)")
    parser.add_argument("--width", type=positive_int, default=None,
                        help="with --pipeline: image width (default: the pipeline's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="with --pipeline: the dtype it runs in (default: float32; bfloat16 on a GPU for FLUX)")
    parser.add_argument("--device", default=None,
                        help="with --pipeline: where it runs, e.g. cuda, cuda:1 or cpu (default: this rank's GPU "
                             "if there is one, else the CPU)")


def add_nproc_option(parser: argparse.ArgumentParser) -> None:
    """Data-parallel ranks (``recache.distributed``): ``--nproc`` here, or ``torchrun ... -m recache`` for several
    machines."""
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="processes on this machine, sharing the pairs, started with torchrun (default: 1); "
                             "for several machines start 'torchrun ... -m recache' yourself (docs/distributed.md)")
    parser.set_defaults(data_parallel=True)


def load_sampler(args: argparse.Namespace, output_type: str = "latent"):
    """The embedded ``DigitPipeline`` (``--model``), or ``DiffusersRollouts`` for ``--pipeline``."""
    if args.pipeline is None:
        names = ("prompt", "prompts", "height", "width", "dtype", "device")
        if given := given_options(args, tuple(n for n in names if hasattr(args, n))):
            raise RecacheError(f"{', '.join(given)}: these options need --pipeline")
        return DigitPipeline.from_pretrained(args.model, steps=args.steps, guidance=args.guidance, sigmas=args.sigmas)
    if args.model != "mnist-dit" or args.sigmas is not None:
        raise RecacheError("--pipeline replaces --model and --sigmas (a pipeline brings its own scheduler); "
                           "give one or the other")
    from recache.sampling.diffusers_rollouts import load_rollouts  # imported on use: diffusers is slow to import

    if getattr(args, "mechanism", None) not in (None, *HOOK_MECHANISMS):
        raise RecacheError(f"mechanism {args.mechanism!r} cannot run on a diffusers pipeline; "
                           f"choose one of {', '.join(HOOK_MECHANISMS)}")

    prompt = getattr(args, "prompt", None)
    if prompt is not None and args.prompts is not None:
        raise RecacheError("give --prompt or --prompts, not both")
    if prompt is not None and not prompt.strip():
        raise RecacheError("--prompt is empty; give the text to draw")
    return load_rollouts(args.pipeline, args.prompts, args.steps, args.height, args.width, args.guidance, output_type,
                         prompts=[{"prompt": prompt}] if prompt is not None else None, dtype=args.dtype,
                         device=args.device)


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nested", action="store_true", help="with --policy: nested schedules, S(k) inside S(k+1)")
    parser.add_argument("--allow-extrapolate", action="store_true",
                        help="allow a policy's budgets outside its trained range, and a policy or schedule made for "
                             "another sigma grid")


def add_schedule_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=budget_arg, default=None,
                        help=f"{BUDGET_HELP} (a uniform schedule, or the policy's)")
    parser.add_argument("--schedule", default=None, help="a schedule JSON file (from search, a policy, or by hand)")
    parser.add_argument("--policy", default=None,
                        help="a trained policy folder (recache train): its schedule for --budget")
    parser.add_argument("--mechanism", choices=list(MECHANISMS), default=None,
                        help="what fills cached steps (default: the policy's or the schedule file's, else "
                             f"{DEFAULT_MECHANISM})")
    add_policy_options(parser)


def load_policy(folder: str, pipe, mechanism: str | None = None, allow_extrapolate: bool = False):
    """A trained ReCache policy of either version, checked against the pipeline's model and ``mechanism`` when given;
    a v1 policy also against its T and sigma grid (unless extrapolation is allowed), a v2 one per schedule
    (``policy_schedule``)."""
    sigmas = None if allow_extrapolate else pipe.sigma_schedule
    return load_any_policy(folder, T=pipe.steps, model=pipe.model_id, mechanism=mechanism, sigmas=sigmas)


def policy_schedule(policy, k: int, pipe, nested: bool = False, allow_extrapolate: bool = False) -> Schedule:
    """A policy's schedule of ``k`` passes on the pipeline's own sigma grid (checked against what it was trained on,
    unless extrapolation is allowed). A v1 policy trained on a diffusers pipeline is tied to its T and scheduler by
    name, so it is not given the grid (a diffusers pipeline's is read by one sample, ``DiffusersRollouts.sigmas``)."""
    sigmas = pipe.sigmas if isinstance(policy, NoiseLevelPolicy) or isinstance(pipe, DigitPipeline) else None
    return policy.schedule(k, nested=nested, allow_extrapolate=allow_extrapolate, sigmas=sigmas)


def load_schedule(path: str, pipe, allow_extrapolate: bool = False) -> Schedule:
    """A schedule file, checked against the pipeline's T, model and sigma grid (unless extrapolation is allowed)."""
    sigmas = None if allow_extrapolate else pipe.sigma_schedule
    return Schedule.load(path, T=pipe.steps, model=pipe.model_id, sigmas=sigmas)


def resolve_schedule(args: argparse.Namespace, pipe):
    """The schedule a run asked for (a file, the policy's or a uniform one for ``--budget``, or None for uncached
    sampling) and the mechanism to run it with."""
    if args.schedule is not None and (args.budget is not None or args.policy is not None):
        raise RecacheError("give either --schedule or --budget (with or without --policy), not both")
    if args.nested and args.policy is None:
        raise RecacheError("--nested needs --policy: it orders a learned policy's schedules")
    if args.mechanism is not None and args.budget is None and args.schedule is None:
        raise RecacheError("--mechanism needs --budget or --schedule: without them every step runs the full network")
    if args.policy is not None:
        if args.budget is None:
            raise RecacheError("--policy needs --budget: the number of full passes to schedule")
        policy = load_policy(args.policy, pipe, args.mechanism, args.allow_extrapolate)
        k = resolve_budget(args.budget, pipe.steps)
        return policy_schedule(policy, k, pipe, args.nested, args.allow_extrapolate), policy.config.mechanism
    if args.schedule is not None:
        schedule = load_schedule(args.schedule, pipe, args.allow_extrapolate)
        made_for = schedule.metadata.get("mechanism")
        if made_for is not None and made_for not in MECHANISMS:
            raise RecacheError(f"schedule file {args.schedule} names an unknown mechanism {str(made_for)[:100]!r}")
        if args.mechanism is not None and made_for is not None and args.mechanism != made_for:
            raise RecacheError(f"schedule file {args.schedule} was made for mechanism {made_for!r}, not "
                               f"{args.mechanism!r}; leave out --mechanism to run it with its own")
        return schedule, args.mechanism or made_for or DEFAULT_MECHANISM
    mechanism = args.mechanism or DEFAULT_MECHANISM
    if args.budget is None:
        return None, mechanism
    k = resolve_budget(args.budget, pipe.steps)
    schedule = Schedule.uniform(pipe.steps, k, model=pipe.model_id, mechanism=mechanism, sigmas=pipe.sigma_schedule)
    return schedule, mechanism


def check_writable(folder: Path, what: str | None = None) -> None:
    """Fail early, with a clear message, when results could not be written to ``folder`` (``what`` names it). Leaves
    nothing behind: the probe is a temporary file in the nearest folder that exists."""
    what = what or f"output folder {folder}"
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RecacheError(f"{what} is not writable ({existing} is a file)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise RecacheError(f"{what} is not writable ({e.strerror})") from None


def check_writable_file(path: Path) -> None:
    """Fail early when the output file ``path`` could not be written: it is a folder or a device, its name is too
    long, or its folder is not writable (``recache.io.output_target``)."""
    path = output_target(path)
    check_writable(path.parent, f"folder {path.parent} of output file {path.name}")
