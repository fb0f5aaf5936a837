"""Which config changes a resumed run accepts: those that cannot change the weights it produces.

A run folder holds one experiment. Resuming compares the new config with the one stored in the newest
checkpoint (not ``config.json``, which a failed start may have written) field by field:

* free: where and how fast it runs, how often it logs, how long it goes on. Raising ``optim.max_steps``
  (or ``optim.epochs``) extends a finished run: the learning rate depends on the step alone (constant
  after warm-up), so the first steps are the same either way. The same length as the checkpoint's step
  just exports again; a length below it is refused (`refused_length`): the run would record a config of
  N steps over a model trained for more, and there is no way back to step N.
* refused: everything else, among them ``run.seed`` (every random draw is a function of seed, step and
  rank), ``run.precision`` and ``run.tf32`` (numerics), the data, the model, the losses, the optimizer
  and the teacher with its weights.

``run.compile`` and ``run.device`` are free although they change rounding (another kernel, another sum
order): the run is the same experiment, not bitwise the same floats. So are ``model.grad_checkpointing``
(the same forward, recomputed) and ``optim.grad_accum`` (the same global batch, data and draws per
sample for the SiT; micro-batches are virtual ranks, so the VAE's draws stay those of the run when
processes x grad_accum stays, e.g. 8 GPUs x 1 resumed on 4 x 2): what fits the GPUs at hand, like the
number of processes. What depends on the micro-batch as a batch (train/vae.py: the PatchGAN's BatchNorm,
the mapper's running LatentNorm, REPA-E's latent BatchNorm) follows the new split from then on.
"""

from __future__ import annotations

from typing import Any

# Dotted config keys (or "section.*") whose change a resume accepts, for every trainer.
FREE_COMMON = frozenset(
    {
        "preset",
        "run.output_dir",
        "run.exp_name",
        "run.device",
        "run.compile",
        "run.channels_last",
        "run.log_every",
        "run.ckpt_every",
        "run.keep_ckpts",
        "run.sample_every",
        "run.tensorboard",
        "run.stats_images",
        "run.fault_nan_steps",
        "run.fault_exit_step",
        "run.fault_exit_micro",
        "data.num_workers",
        "model.grad_checkpointing",
        "optim.max_steps",
        "optim.epochs",
        "optim.grad_accum",
    }
)
# train-vae: the initial weights are replaced by the checkpoint's; downloading changes no tensor.
FREE_VAE = FREE_COMMON | {"model.vae_ckpt", "model.disc_ckpt", "teacher.allow_download"}
# train-sit: the VAE only decodes grids and proxy-FD samples; evaluation cadence is not training.
FREE_SIT = FREE_COMMON | {"model.vae", "model.vae_config", "eval.*"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_free(key: str, free: frozenset[str] | set[str]) -> bool:
    return key in free or f"{key.split('.')[0]}.*" in free


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every dotted key that differs (JSON values: lists for tuples)."""
    import json

    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def refused_changes(old: dict[str, Any], new: dict[str, Any], free: frozenset[str] | set[str]) -> list[str]:
    """'key: old -> new' for each change that would make the resumed run another experiment."""
    return [f"{k}: {o!r} -> {n!r}" for k, o, n in config_changes(old, new) if not _is_free(k, free)]


def refused_length(checkpoint_step: int, max_steps: int) -> str | None:
    """Why a resume at ``checkpoint_step`` cannot run to ``max_steps`` (the length the config resolves to,
    from ``optim.max_steps`` or ``optim.epochs``), or None when it can."""
    if max_steps >= checkpoint_step:
        return None
    return (
        f"its checkpoint is at step {checkpoint_step}, past the {max_steps} steps asked for "
        f"(--optim.max_steps or --optim.epochs); resume it with at least {checkpoint_step} steps, or train "
        "a shorter run under a new --exp-name"
    )
