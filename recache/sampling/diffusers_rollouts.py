"""``DiffusersRollouts``: a diffusers pipeline seen the way the ReCache trainer and the BudCache search see the
embedded DiT (``DigitPipeline``): conditions are indices into a list of prompts, ``rollouts(conds, seeds)`` are the
uncached outputs, ``rollout_rows`` the outputs under per-row compute masks, run through the recache hooks.

Every sample has its own ``torch.Generator`` seeded by its seed, so it never depends on its batch. The rows of a
batch run in one pipeline call, each by its own mask (the hooks' row schedules: at each step only the rows that
compute run the blocks); the realised full passes of each row are read from the hooks (every CFG branch must run k).
Outputs are the pipeline's final latents (``output_type="latent"``), or images when a reward needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from recache import distributed
from recache.data.prompts import load_prompts
from recache.errors import NonFiniteError, RecacheError
from recache.hooks.clock import pipeline_clock
from recache.hooks.schedule_cache import (
    RecacheHookConfig,
    apply_recache,
    is_recache_enabled,
    remove_recache,
)
from recache.hooks.transformers import denoisers_of, model_fingerprint, transformer_blocks
from recache.mechanisms import Mechanism
from recache.models.flux_digits import FluxDigitsPipeline
from recache.protocol import check_pairs
from recache.sampling.cached import masks_of
from recache.schedule import Schedule

Generate = Callable[[list[int], list[int], int], torch.Tensor]  # (conditions, seeds, steps) -> outputs


@dataclass
class DiffusersRollouts:
    """A pipeline, its conditions (``prompts``: pipeline keyword arguments, one dict each) and the call settings.

    ``generate`` replaces the default call ``pipe(prompt=[...], generator=[...], num_inference_steps=T,
    output_type=..., **call_kwargs)`` for pipelines whose conditions are not prompts (the shipped digit FLUX)."""

    pipe: object
    prompts: list[dict]
    steps: int
    call_kwargs: dict = field(default_factory=dict)
    output_type: str = "latent"
    generate: Generate | None = None
    outputs_digits: bool = False  # outputs are (B, 1, 20, 20) digits: the digit classifier's reward applies
    name: str | None = None
    max_rows: int | None = None  # the most rollouts one pipeline call carries (None: all of a batch; set it on a GPU)
    signed: bool = False  # images (output_type "pt") mapped from [0, 1] to [-1, 1], the package's convention (eval)
    scheduler: object | None = None  # runs in place of the pipeline's own scheduler (``with_grid``)
    _grid: torch.Tensor | None = field(default=None, init=False, repr=False)  # ``sigmas``, once read

    def __post_init__(self):
        for transformer in denoisers_of(self.pipe):  # supported transformers (Wan 2.2: both experts), or a clear error
            transformer_blocks(transformer)
        if not self.prompts:
            raise RecacheError("a pipeline run needs at least one prompt")

    @property
    def model_id(self) -> str:
        return model_fingerprint(self.pipe.transformer)

    @property
    def sigma_schedule(self) -> str:
        return type(self.pipe.scheduler).__name__

    @property
    def guidance(self) -> float | None:
        return self.call_kwargs.get("guidance_scale", self.call_kwargs.get("true_cfg_scale"))

    @property
    def num_conditions(self) -> int:
        return len(self.prompts)

    def condition_texts(self) -> list[str]:
        return [p["prompt"] for p in self.prompts]

    def with_grid(self, steps: int, shift: float) -> DiffusersRollouts:
        """The same pipeline run for ``steps`` steps on the time-shifted grid of ``shift`` (1: the unshifted one), by
        a copy of its flow-matching scheduler with that static ``shift`` (a dynamic shift ``mu`` of FLUX is the
        static shift ``exp(mu)``), used in place of its own for these rollouts only. For the v2 trainer and
        ``align_shift``."""
        own = self.pipe.scheduler
        if "shift" not in own.config or not hasattr(type(own), "from_config"):
            raise RecacheError(f"the scheduler of this pipeline ({type(own).__name__}) has no time shift to set per "
                               "grid, which v2 training and alignment on a pipeline need; train it with --trainer "
                               "reinforce, on its own grid")
        scheduler = type(own).from_config(own.config, shift=float(shift), use_dynamic_shifting=False)
        return replace(self, steps=int(steps), scheduler=scheduler)

    @property
    def sigmas(self) -> torch.Tensor:
        """The sigma grid this pipeline runs for ``steps`` steps (``steps + 1`` values, the final 0 included; what the
        hooks' clock reads): read from the scheduler after one uncached sample, made once, when first asked for."""
        if self._grid is None:
            self._run([0], [0])
            sigmas = getattr(self.scheduler or self.pipe.scheduler, "sigmas", None)
            if not (isinstance(sigmas, torch.Tensor) and len(sigmas) == self.steps + 1):
                raise RecacheError(f"the scheduler ({type(self.pipe.scheduler).__name__}) does not hold a grid of "
                                   f"{self.steps} steps after a call")
            self._grid = sigmas.detach().float().cpu()
        return self._grid

    def _run(self, conds: list[int], seeds: list[int]) -> torch.Tensor:
        """The pipeline's outputs; ``NonFiniteError`` names the first step whose transformer output had NaN or inf
        (read from the scheduler's ``step_index``), or the rows whose final output has."""
        if self.scheduler is None:
            return self._run_with_scheduler(conds, seeds)
        own, self.pipe.scheduler = self.pipe.scheduler, self.scheduler
        try:
            return self._run_with_scheduler(conds, seeds)
        finally:
            self.pipe.scheduler = own

    def _run_with_scheduler(self, conds: list[int], seeds: list[int]) -> torch.Tensor:
        first_bad: list[int] = []

        def watch(module, args, output):
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            if not first_bad and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                first_bad.append(getattr(self.pipe.scheduler, "step_index", None) or 0)

        handles = [t.register_forward_hook(watch) for t in denoisers_of(self.pipe)]
        try:
            if self.generate is not None:
                out = self.generate(conds, seeds, self.steps)
            else:
                batch = {key: [self.prompts[c][key] for c in conds] for key in self.prompts[0]}
                generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
                out = self.pipe(**batch, **self.call_kwargs, generator=generators, num_inference_steps=self.steps,
                                output_type=self.output_type)[0]
        finally:
            for handle in handles:
                handle.remove()
        out = out.float().cpu()  # scored on the CPU in float32, whatever the pipeline runs in
        if self.signed and self.output_type == "pt" and not self.outputs_digits:
            out = out * 2 - 1
        bad = (~torch.isfinite(out.flatten(1)).all(1)).nonzero().squeeze(1).tolist()
        if first_bad or bad:
            where = (f"the transformer's output at sampler step {first_bad[0]} of {self.steps}" if first_bad
                     else "the final outputs")
            rows = bad or list(range(len(conds)))
            prompt = self.prompts[conds[rows[0]]].get("prompt", conds[rows[0]])
            raise NonFiniteError(f"non-finite values (NaN or inf) in {where}, for prompt {prompt!r} "
                                 f"with seed {seeds[rows[0]]}"
                                 + (f" and {len(rows) - 1} more" if len(rows) > 1 else ""))
        return out

    def check_pairs(self, conds, seeds) -> list[int]:
        return check_pairs(conds, seeds, self.num_conditions, "prompt index").tolist()

    @torch.no_grad()
    def __call__(self, conds, seeds) -> torch.Tensor:
        """Uncached outputs for ``prompts[conds[i]]`` from the noise of ``seeds[i]``."""
        if any(is_recache_enabled(t) for t in denoisers_of(self.pipe)):
            raise RecacheError("recache is enabled on this pipeline; disable it before computing uncached targets")
        return self._run(self.check_pairs(conds, seeds), list(seeds))

    @torch.no_grad()
    def rollout_rows(self, conds, seeds, masks: torch.Tensor,
                     mechanism: str | Mechanism) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``i`` samples ``prompts[conds[i]]`` from ``seeds[i]`` under ``masks[i]``; returns the outputs and each
        row's realised full passes (per CFG branch, counted by the hooks). The rows run in one pipeline call (at most
        ``max_rows`` a call), each by its own schedule (the hooks' row schedules); a pipeline with two experts
        (Wan 2.2) runs one call per distinct schedule."""
        conds, seeds = self.check_pairs(conds, seeds), [int(s) for s in seeds]
        name = mechanism if isinstance(mechanism, str) else mechanism.name
        masks = masks.bool()
        groups = ([torch.arange(len(conds))] if len(denoisers_of(self.pipe)) == 1
                  else [(masks == m).all(1).nonzero().squeeze(1) for m in torch.unique(masks, dim=0)])
        out, passes = None, torch.zeros(len(conds), dtype=torch.long)
        for rows in (c.tolist() for g in groups for c in g.split(self.max_rows or len(conds))):
            config = RecacheHookConfig(row_schedules=[Schedule(tuple(masks[r].tolist())) for r in rows],
                                       mechanism=name, clock=pipeline_clock(self.pipe))
            stats = apply_recache(denoisers_of(self.pipe), config)
            try:
                images = self._run([conds[r] for r in rows], [seeds[r] for r in rows])
            finally:
                remove_recache(denoisers_of(self.pipe))
            realised = {tuple(r["row_passes"]) for call in stats.calls + [stats.current] for r in call.values()}
            if len(realised) != 1:
                raise RuntimeError(f"CFG branches realised different budgets {sorted(realised)}")
            out = images.new_empty((len(conds), *images.shape[1:])) if out is None else out
            out[rows], passes[rows] = images, torch.tensor(realised.pop())
        return out, passes

    def for_schedule(self, schedule: Schedule) -> DiffusersRollouts:
        """This pipeline, or for a schedule aligned by ``recache align --pipeline`` (``aligned_shift``) the same
        pipeline on the shift it was aligned to."""
        shift = schedule.metadata.get("aligned_shift")
        return self if shift is None else self.with_grid(self.steps, float(shift))

    def rollout(self, conds, seeds, schedules: list[Schedule],
                mechanism: str | Mechanism) -> tuple[torch.Tensor, torch.Tensor]:
        """Every schedule on every (prompt, seed) pair: outputs (G, B, ...) and realised full passes (G, B); aligned
        schedules on the grid they were aligned to (``for_schedule``), which must then be the same for all."""
        shifts = {s.metadata.get("aligned_shift") for s in schedules}
        if len(shifts) > 1:
            raise RecacheError("schedules of one batched call must share their sigma grid (aligned or not)")
        if shifts != {None}:
            return self.for_schedule(schedules[0]).rollout(conds, seeds, [Schedule(s.mask) for s in schedules],
                                                           mechanism)
        G, B = len(schedules), len(seeds)
        for schedule in schedules:
            if schedule.T != self.steps:
                raise RecacheError(f"schedule has T={schedule.T} steps but the pipeline runs {self.steps}")
        conds = torch.as_tensor(self.check_pairs(conds, seeds))
        out, passes = self.rollout_rows(conds.repeat(G), list(seeds) * G,
                                        masks_of(schedules).repeat_interleave(B, dim=0), mechanism)
        return out.view(G, B, *out.shape[1:]), passes.view(G, B)


def _digit_flux_rollouts(name: str, prompts: list[dict] | None, steps: int | None,
                         guidance: float | None) -> DiffusersRollouts:
    digits = FluxDigitsPipeline.from_pretrained(name, steps=steps, guidance=guidance)
    prompts = prompts or [{"prompt": str(c)} for c in range(10)]
    bad = [p["prompt"] for p in prompts
           if p["prompt"].strip() not in [str(c) for c in range(10)] or "negative_prompt" in p]
    if bad:
        raise RecacheError(f"prompt {bad[0]!r} is not a digit: the prompts of {name} are the classes 0-9, one per line")
    classes = [int(p["prompt"]) for p in prompts]
    return DiffusersRollouts(digits.pipe, prompts, digits.steps, {"true_cfg_scale": digits.guidance},
                             outputs_digits=True, name=name,
                             generate=lambda conds, seeds, T: digits([classes[c] for c in conds], seeds,
                                                                     num_inference_steps=T))


def check_prompt_lengths(pipe, prompts: list[dict]) -> None:
    """A prompt longer than the pipeline's longest-context tokenizer allows would be cut by every text encoder:
    refused, naming it (a prompt that only the shorter CLIP encoder cuts, as FLUX's, is the pipeline's normal)."""
    tokenizers = [t for name in ("tokenizer", "tokenizer_2", "tokenizer_3") if (t := getattr(pipe, name, None))]
    if not tokenizers:
        return
    longest = max(tokenizers, key=lambda t: t.model_max_length)
    for number, prompt in enumerate(prompts, 1):
        for key in ("prompt", "negative_prompt"):
            text = prompt.get(key)
            if isinstance(text, str) and (n := len(longest(text).input_ids)) > longest.model_max_length:
                raise RecacheError(f"{key} {number} ({text[:30]!r}...) has {n} tokens, more than the "
                                   f"{longest.model_max_length} the pipeline's text encoders take")


def check_device(name: str) -> torch.device:
    """A device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``), or one clear error."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RecacheError(f"device {name!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise RecacheError(f"device {name!r} is not available here ({torch.cuda.device_count()} CUDA GPU(s))")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RecacheError(f"device {name!r} is not available here (no Apple GPU)")
    return device


def load_rollouts(pipeline: str, prompts_file: str | None = None, steps: int | None = None, height: int | None = None,
                  width: int | None = None, guidance: float | None = None, output_type: str = "latent",
                  prompts: list[dict] | None = None, dtype: str | None = None,
                  device: str | None = None) -> DiffusersRollouts:
    """``--pipeline DIR_OR_ID`` with ``--prompts FILE``: the shipped digit FLUX (``mnist-flux``, prompts are digits,
    all ten by default) or any diffusers pipeline with a supported transformer (``DiffusionPipeline.from_pretrained``;
    offline, a hub id must already be in the local cache). ``steps`` defaults to the pipeline's own default.
    ``prompts`` (pipeline keyword arguments, one dict each) may be given instead of the file. ``dtype`` (float32,
    bfloat16 or float16) and ``device`` (default: this rank's GPU, else the CPU) say how a pipeline runs."""
    import inspect

    prompts = load_prompts(prompts_file) if prompts_file is not None else prompts
    if pipeline == "mnist-flux" or (Path(pipeline) / "recache.json").exists():
        if height is not None or width is not None:
            raise RecacheError(f"{pipeline} draws 20x20 digits: --height and --width do not apply to it")
        if dtype not in (None, "float32") or device not in (None, "cpu"):
            raise RecacheError(f"{pipeline} runs in float32 on the CPU: --dtype and --device do not apply to it")
        return _digit_flux_rollouts(pipeline, prompts, steps, guidance)
    if prompts is None:
        raise RecacheError(f"pipeline {pipeline} needs a prompts file (--prompts FILE: .txt, .jsonl or .csv; "
                           "recache sample also takes --prompt TEXT)")
    device = check_device(device) if device is not None else distributed.device()  # before the long load
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its warnings while it fails are noise beside our one line
    try:
        pipe = DiffusionPipeline.from_pretrained(pipeline, use_safetensors=True,  # never pickled .bin weights
                                                 torch_dtype=getattr(torch, dtype) if dtype else None)
    except Exception as e:  # a missing folder, an id not in the offline cache, a broken model_index.json
        reason = (str(e).splitlines() or [""])[0].split(" (")[0]
        raise RecacheError(f"pipeline {pipeline!r} cannot be loaded ({type(e).__name__}: {reason})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if not hasattr(pipe, "transformer"):
        raise RecacheError(f"pipeline {pipeline!r} ({type(pipe).__name__}) has no transformer to cache")
    check_prompt_lengths(pipe, prompts)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if steps is None:
        steps = inspect.signature(pipe.__call__).parameters.get(
            "num_inference_steps", inspect.Parameter("n", 1, default=28)).default
    call = {k: v for k, v in (("height", height), ("width", width), ("guidance_scale", guidance)) if v is not None}
    return DiffusersRollouts(pipe, prompts, int(steps), call, output_type=output_type, outputs_digits=False,
                             name=pipeline)
