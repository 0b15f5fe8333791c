"""The main job's settings: one tree of frozen dataclasses, each part consumed by the library code
it configures (the rollout's RolloutConfig, the learner's GRPOConfig), exposed by tyro as flags
(`--grpo.eps-high 0.3`) and read from YAML/JSON files with the same nesting:

    cfg = Config()                                                    # the defaults: Qwen2.5-0.5B
    cfg = config_from_dict({"steps": 50, "grpo": {"eps_high": 0.3}})  # checked, field by field
    flat = flatten(dataclasses.asdict(cfg))                           # {"grpo.eps_high": 0.3, ...}

Each default is written once, in the dataclass that owns the setting.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import tyro

from toolgrpo.agents.rollout import RolloutConfig
from toolgrpo.agents.training.checks import check_finite
from toolgrpo.agents.training.distributed import DistConfig
from toolgrpo.agents.training.env_config import EnvConfig
from toolgrpo.agents.training.health import HealthConfig
from toolgrpo.agents.training.loop import PIPELINED_TIS_CAP
from toolgrpo.learners.train import GRPOConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


@dataclass(frozen=True)
class ModelConfig:
    """The policy: a Qwen2 checkpoint with LoRA on every attention and MLP projection."""

    name: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """Hugging Face hub id or local directory (config.json, *.safetensors, tokenizer)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of the learner and the JAX sampler (LoRA and optimizer state stay fp32):
    "auto" is bfloat16 on a GPU or TPU, float32 on the CPU."""
    remat: bool = True
    """Recompute activations in the backward pass (less memory)."""
    attention: Literal["auto", "blockwise", "dot_product"] = "auto"
    """Attention of whole sequences (toolgrpo.learners.attention): "auto" is cuDNN's fused kernel on a
    GPU in bf16 (dot_product), the blockwise (flash) formulation elsewhere."""
    attention_block: int = 512
    """Positions per block of the blockwise attention."""
    lora_rank: int = 128
    """LoRA rank."""
    lora_alpha: float = 128.0
    """LoRA alpha (scale alpha / rank)."""

    def compute_dtype(self, backend: str) -> str:
        """The dtype `dtype` means on a jax backend ("cpu", "gpu", "tpu")."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if backend == "cpu" else "bfloat16"

    def __post_init__(self):
        if self.attention_block < 1:
            raise ValueError(f"attention_block must be >= 1, got {self.attention_block}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(
                f"lora_rank and lora_alpha must be positive, got {self.lora_rank}, "
                f"{self.lora_alpha}"
            )


@dataclass(frozen=True)
class SamplerConfig:
    """The rollout engine."""

    engine: Literal["auto", "vllm", "jax"] = "auto"
    """vLLM when installed and a GPU is present ("auto"), or forced."""
    vllm_url: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Use these running vLLM servers (started with --enable-lora) instead of launching one;
    give the flag once a server. Requests are spread over them; each new adapter is loaded on
    every one before any sample is tagged with its version."""
    vllm_gpu_memory: float = 0.35
    """GPU memory share of a launched vLLM server; the JAX learner gets most of the rest."""
    recover_s: float = 60.0
    """How long a collection whose vLLM server (given by --sampler.vllm-url) stopped answering
    waits for it, with backoff, before the run stops; a launched server is restarted instead."""
    max_replays: int = 3
    """Replays of one collection whose vLLM server failed before the run stops."""

    def __post_init__(self):
        if not 0 < self.vllm_gpu_memory < 0.9:
            raise ValueError(f"vllm_gpu_memory must be in (0, 0.9), got {self.vllm_gpu_memory}")
        if self.recover_s < 0 or self.max_replays < 0:
            raise ValueError(
                f"recover_s ({self.recover_s}) and max_replays ({self.max_replays}) must be >= 0"
            )


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: pass@1 (the mean over samples) and pass@k."""

    every: int = 25
    """Evaluate every N steps (and at the end); 0: only at the end."""
    samples: int = 8
    """Samples per problem (pass@k for k up to this)."""
    limit: int | None = None
    """Evaluate on the first N problems only."""

    def __post_init__(self):
        if self.every < 0 or self.samples < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError(
                f"need eval every >= 0, samples >= 1, limit >= 1; got {self.every}, "
                f"{self.samples}, {self.limit}"
            )


@dataclass(frozen=True)
class LogConfig:
    """What a run writes besides metrics.jsonl and the plots."""

    wandb: bool = True
    """Log to Weights & Biases (online with a key, offline otherwise); --log.no-wandb: off."""
    wandb_project: str = "toolgrpo"
    """Weights & Biases project."""
    checkpoint_every: int = 10
    """Save a checkpoint (and its PEFT adapter) every N steps, on Ctrl-C and at the end."""
    keep_checkpoints: int = 3
    """Checkpoints kept."""
    transcripts_every: int = 10
    """Write the transcripts of a few episodes every N steps (0: never)."""
    export_merged: bool = False
    """Also write the final adapter merged into a Hugging Face model directory (OUT/merged)."""

    def __post_init__(self):
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.transcripts_every < 0:
            raise ValueError(
                f"checkpoint_every and keep_checkpoints must be >= 1, "
                f"transcripts_every >= 0; got {self.checkpoint_every}, "
                f"{self.keep_checkpoints}, {self.transcripts_every}"
            )


@dataclass(frozen=True)
class Config:
    """A GRPO run: the loop's own settings, then one section per part."""

    out: str = "runs/aime_grpo"
    """Run directory: metrics.jsonl, plots, transcripts, checkpoints, the exported adapter."""
    steps: int = 200
    """GRPO steps."""
    problems_per_step: int = 8
    """Problems a step; each is played rollout.group_size times."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal and refill with new problems (DAPO)."""
    max_refills: int = 2
    """Extra collections a step may make to refill dropped groups."""
    max_staleness: int = 1
    """Pipelined rollouts: the next steps' batches are collected while this one learns, by an
    adapter at most this many updates older than the one they train (0: synchronous, collect
    then learn). Above 0 the update weights tokens by truncated importance sampling
    (grpo.tis_cap, 2.0 unless set)."""
    seed: int = 0
    """Seed of sampling, LoRA initialisation and problem order."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint. Its settings must agree with the
    saved config.json, but for steps, out, debug, allow_cpu and the sampler, eval and log
    sections."""
    overwrite: bool = False
    """Delete what --out holds and start a new run there (without it, a non-empty --out is
    refused)."""
    allow_cpu: bool = False
    """Run on the CPU even where jax has no access to the machine's GPU or TPU."""
    debug: bool = False
    """Show the traceback of an input error instead of its one-line message."""
    config_file: tyro.conf.Suppress[str | None] = None
    """The YAML/JSON file these settings were read from (set by load_config, not a flag): an
    input of the run, which --overwrite never deletes."""
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self):
        check_finite(dataclasses.asdict(self))
        if (
            self.steps < 1
            or self.problems_per_step < 1
            or self.max_refills < 0
            or self.max_staleness < 0
        ):
            raise ValueError(
                f"need steps >= 1, problems_per_step >= 1, max_refills >= 0, "
                f"max_staleness >= 0; got {self.steps}, {self.problems_per_step}, "
                f"{self.max_refills}, {self.max_staleness}"
            )
        if self.rollout.group_size < 2:
            raise ValueError(
                f"rollout.group_size must be >= 2 (GRPO compares the episodes of a "
                f"group), got {self.rollout.group_size}"
            )
        batch, mbs = self.problems_per_step * self.rollout.group_size, self.grpo.micro_batch_size
        if mbs and batch > mbs and batch % mbs:
            raise ValueError(
                f"grpo.micro_batch_size {mbs} must divide problems_per_step x "
                f"rollout.group_size = {batch}"
            )
        if self.rollout.max_total_tokens < self.rollout.max_turn_tokens:
            raise ValueError(
                f"rollout.max_total_tokens ({self.rollout.max_total_tokens}) is "
                f"smaller than one turn's budget rollout.max_turn_tokens "
                f"({self.rollout.max_turn_tokens})"
            )
        if self.resume and self.overwrite:
            raise ValueError(
                "--resume continues the run in --out, --overwrite deletes it: give one of them"
            )

    def grpo_for_run(self) -> GRPOConfig:
        """The learner's settings, with the schedule's horizon set to this run's optimizer steps
        when the config leaves it open, and for a pipelined run (max_staleness > 0) truncated
        importance sampling at PIPELINED_TIS_CAP unless grpo.tis_cap is set."""
        grpo = self.grpo
        if grpo.total_steps is None:
            grpo = dataclasses.replace(grpo, total_steps=self.steps * grpo.ppo_epochs)
        if self.max_staleness and grpo.tis_cap is None:
            grpo = dataclasses.replace(grpo, tis_cap=PIPELINED_TIS_CAP)
        return grpo


RESUMABLE_CHANGES = (
    "steps",
    "resume",
    "overwrite",
    "out",
    "debug",
    "config_file",
    "allow_cpu",
    "eval",
    "log",
    "sampler",
    "dist",
    "health",
    "grpo.max_skipped_updates",
)
"""Settings (or whole sections) a resumed run may change; any other difference from the saved
config.json stops it."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"grpo": {"eps_high": 0.3}} -> {"grpo.eps_high": 0.3}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_from_dict(values: dict, cls: type[DataclassInstance] = Config, where: str = "") -> Any:
    """A `cls` from a nested mapping (a YAML file, a saved config.json), every value checked
    against its field's type: a ValueError names the first bad key, with its dotted path."""
    if not isinstance(values, dict):
        # a ValueError like every other bad config: the value comes from a file, not from code
        message = f"{where or 'the config'} must map setting names to values"
        raise ValueError(message)  # noqa: TRY004
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown settings {[where + k for k in unknown]} (spell them as the "
            "fields of toolgrpo.agents.training.config, with underscores)"
        )
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            kwargs[key] = config_from_dict(value, hint, f"{where}{key}.")
        elif typing.get_origin(hint) is tuple and args and dataclasses.is_dataclass(args[0]):
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{where}{key} is {value!r}, expected a list")
            kwargs[key] = tuple(
                config_from_dict(v, args[0], f"{where}{key}[{i}].") for i, v in enumerate(value)
            )
        elif _fits(value, hint):
            kwargs[key] = tuple(value) if typing.get_origin(hint) is tuple else value
        else:
            raise ValueError(f"{where}{key} is {value!r}, expected {_type_name(hint)}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{where.rstrip('.') or 'config'}: {exc}") from None


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _fits(value, hint) -> bool:
    """Whether a YAML/JSON value fits a field's type (the types the configs use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if args and type(None) in args:  # X | None
        return value is None or any(_fits(value, a) for a in args if a is not type(None))
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True
