"""Export the LoRA adapter of any checkpoint of a main-job run, in PEFT's format.

    python experiments/export.py runs/aime_grpo                   # the latest checkpoint
    python experiments/export.py runs/aime_grpo --step 40 --out adapter40
    python experiments/export.py runs/aime_grpo --step 40 --merged  # also a merged HF model

The run's config.json says which model, LoRA rank and optimizer the checkpoint was written with;
the base model is loaded from there (a hub id or a local directory). The adapter directory loads
in PEFT (`PeftModel.from_pretrained`), in vLLM (`--lora-modules`) and in
`experiments/evaluate.py --adapter`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import tyro


@dataclass(frozen=True)
class Args:
    """Which run and checkpoint to export, and where to."""

    run: tyro.conf.Positional[str]
    """The run directory (what --out was): config.json and checkpoints/."""
    step: int | None = None
    """The checkpoint's step (default: the latest kept)."""
    out: str | None = None
    """Where to write the adapter (default: RUN/exported/STEP)."""
    merged: bool = False
    """Also write OUT/merged: the base model with the adapter merged in (Hugging Face format)."""
    debug: bool = False
    """Show tracebacks instead of one-line errors."""


def run_config(run: str):
    """The main job's Config a run was started with (its config.json)."""
    from toolgrpo.agents.training import config_from_dict

    path = os.path.join(run, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run} is not a run directory of the main job: no config.json")
    with open(path) as f:
        saved = json.load(f)
    saved.pop("environment", None)  # what the run ran on, not a setting
    try:
        return config_from_dict(saved)
    except ValueError as exc:
        raise ValueError(f"{path} is not a main-job config: {exc}") from None


def export(args: Args) -> str:
    from flax import nnx

    from toolgrpo.agents.training import build_learner
    from toolgrpo.learners.checkpoint import Checkpointer
    from toolgrpo.learners.lora import merge_lora, save_peft_adapter
    from toolgrpo.learners.params import save_pretrained
    from toolgrpo.learners.tokenizer import load_tokenizer

    cfg = run_config(args.run)
    directory = os.path.join(args.run, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{args.run} holds no checkpoints/ directory")
    ckpt = Checkpointer(directory, keep=10**6)  # keep: never prune what is there
    if not ckpt.steps:
        raise FileNotFoundError(f"{directory} holds no checkpoint")
    step = ckpt.latest_step if args.step is None else args.step
    if step not in ckpt.steps:
        raise ValueError(f"{directory} has no checkpoint {step}; it has {ckpt.steps}")
    model, _, template = build_learner(cfg)
    state, _, _ = ckpt.restore(template, step=step)
    nnx.update(model, state.lora)
    out = args.out or os.path.join(args.run, "exported", str(step))
    save_peft_adapter(model, out, base_model_name_or_path=cfg.model.name)
    if args.merged:
        merged = os.path.join(out, "merged")
        save_pretrained(merge_lora(model), merged)
        load_tokenizer(cfg.model.name).save_pretrained(merged)
    return out


def main(args: Args) -> None:
    from toolgrpo.agents.training.cli import configure_logging, exit_codes

    configure_logging()
    hint = "offline? the run's --model.name must be a local directory"
    with exit_codes(debug=args.debug, offline_hint=hint):
        out = export(args)
    print(
        f"exported the adapter to {out}"
        + (f" and the merged model to {out}/merged" if args.merged else "")
    )


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args, description=__doc__.split("\n\n")[0])))
