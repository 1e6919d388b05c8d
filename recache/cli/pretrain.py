"""``recache pretrain dit|classifier|flux``: reproduce the embedded models' committed weights and model cards."""

from __future__ import annotations

import argparse
from pathlib import Path

from recache.cli.options import check_writable, positive_int
from recache.errors import RecacheError
from recache.models.dit import DIT_CONFIGS
from recache.models.pretrained import WEIGHTS_DIR


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train the embedded DiT, digit classifier or Flux digits model from scratch")
    which = p.add_subparsers(dest="which", required=True)
    dit = which.add_parser("dit", help="the class-conditional flow-matching DiT (about 12 min on 2 cores)")
    dit.add_argument("--out", default=str(WEIGHTS_DIR / "mnist-dit"),
                     help="output folder (default: the shipped weights)")
    dit.add_argument("--architecture", choices=list(DIT_CONFIGS), default="DiT-T/4")
    dit.add_argument("--steps", type=positive_int, default=3500, help="optimiser updates (default: 3500)")
    dit.add_argument("--seed", type=int, default=0)
    dit.add_argument("--overwrite", action="store_true", help="replace a finished model (or an unfinished run) in OUT")
    dit.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors if present")
    clf = which.add_parser("classifier", help="the digit classifier (about 2 min on 2 cores)")
    clf.add_argument("--out", default=str(WEIGHTS_DIR / "mnist-classifier"),
                     help="output folder (default: the shipped weights)")
    clf.add_argument("--epochs", type=positive_int, default=30)
    clf.add_argument("--seed", type=int, default=0)
    clf.add_argument("--overwrite", action="store_true", help="replace a finished model (or an unfinished run) in OUT")
    flux = which.add_parser("flux", help="the FLUX-architecture digits model, mnist-flux (about 15 min on one thread)")
    flux.add_argument("--out", default=str(WEIGHTS_DIR / "mnist-flux"),
                      help="output folder (default: the shipped weights)")
    flux.add_argument("--steps", type=positive_int, default=1000, help="optimiser updates (default: 1000)")
    flux.add_argument("--seed", type=int, default=0)
    flux.add_argument("--overwrite", action="store_true", help="replace a finished model (or an unfinished run) in OUT")
    flux.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors if present")
    p.set_defaults(run=run)


def check_out(args: argparse.Namespace) -> None:
    """Before any training: ``--out`` is a writable folder, and what it holds is replaced only when asked for."""
    out, resume = Path(args.out), getattr(args, "resume", False)
    check_writable(out)
    unfinished, model = (out / "checkpoint.safetensors").exists(), (out / "config.json").exists()
    if args.overwrite:
        return
    if unfinished and not resume:
        raise RecacheError(f"{out} holds an unfinished training; resume it (--resume), start again (--overwrite) or "
                           "choose another --out")
    if model and not unfinished:
        nothing = " (there is nothing to resume)" if resume else ""
        raise RecacheError(f"{out} holds a finished model{nothing}; replace it with --overwrite (make weights does) "
                           "or choose another --out")


def run(args: argparse.Namespace) -> int:
    check_out(args)
    if args.which == "dit":
        from recache.training.dit import train_dit

        info = train_dit(args.out, architecture=args.architecture, steps=args.steps, seed=args.seed, resume=args.resume)
    elif args.which == "flux":
        from recache.training.flux_digits import train_flux_digits

        info = train_flux_digits(args.out, steps=args.steps, seed=args.seed, resume=args.resume)
    else:
        from recache.training.classifier import train_classifier

        info = train_classifier(args.out, epochs=args.epochs, seed=args.seed)
    print(", ".join(f"{k}={v}" for k, v in info.items() if k != "data"))
    print(f"saved to {args.out} (model card: {args.out}/MODEL_CARD.md)")
    return 0
