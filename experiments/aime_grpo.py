"""The main job: GRPO with LoRA that teaches Qwen2.5-0.5B-Instruct to solve AIME problems with Python.

    python experiments/aime_grpo.py                                  # defaults below
    python experiments/aime_grpo.py --config my.yaml --steps 500     # a file, then flags
    python experiments/aime_grpo.py --resume --out runs/aime_grpo    # continue a run
    python experiments/aime_grpo.py --model ./qwen --problems aime.jsonl --eval-problems a25.jsonl

Trains on ToolMath-AIME-v0 (AIME 1983-2024) and evaluates on AIME 2025. Rollouts go through vLLM
when it is installed and a GPU is present (a server launched here, or --vllm-url), else through
the in-process JAX sampler; the choice is printed. Every step: collect problems_per_step x
group_size episodes, optionally drop zero-variance groups and refill (DAPO's dynamic sampling),
one GRPO update of the LoRA adapter, push the adapter to the sampler, log. Every eval_every
steps: pass@1 and pass@k on the test problems. Logs: the run directory (metrics.jsonl, PNG plots,
transcripts), Weights & Biases unless --no-wandb. Ctrl-C saves a checkpoint and exits; --resume
continues from the latest one. At the end the adapter is exported in PEFT format (and merged into
a Hugging Face model directory with --export-merged).

How it departs from textbook GRPO (DeepSeekMath): no KL penalty by default (beta 0); clip-higher
(eps_high 0.28, DAPO); dynamic sampling; multi-turn episodes whose tool outputs are masked out of
the loss; rewards from the environment (correct 1.0, boxed answer 0.1, tool ran 0.1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Literal

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Config:
    """Settings of the AIME GRPO run (every one a command-line flag, or a key of --config)."""

    model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """Hugging Face hub id or local directory (config.json, *.safetensors, tokenizer)."""
    env_id: str = "ToolMath-AIME-v0"
    """Training environment (envs.ENV_IDS)."""
    problems: str | None = None
    """Training problems override: a hub id or a local JSON/JSONL/CSV/Parquet file."""
    eval_problems: str | None = None
    """Evaluation problems override (default: the env's test split, AIME 2025)."""
    protocol: str = "markdown"
    """Tool protocol: "markdown" (```python blocks) or "qwen" (<tool_call>)."""
    out: str = "runs/aime_grpo"
    """Run directory: metrics.jsonl, plots, transcripts, checkpoints, the exported adapter."""
    steps: int = 200
    """GRPO steps."""
    problems_per_step: int = 8
    """Problems per step; each is played group_size times."""
    group_size: int = 8
    """Episodes per problem (the GRPO group)."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW on the LoRA parameters."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    lora_rank: int = 128
    """LoRA rank (on every attention and MLP projection)."""
    lora_alpha: float = 128.0
    """LoRA alpha (scale alpha / rank)."""
    beta: float = 0.0
    """KL penalty weight to the base model (0: none, and no reference pass)."""
    micro_batch_size: int | None = 8
    """Episodes per forward/backward (gradient accumulation); None: the whole batch."""
    max_turn_tokens: int = 1024
    """Generation budget of one assistant turn."""
    max_total_tokens: int = 4096
    """Context budget of an episode (prompt, turns and tool outputs)."""
    max_turns: int = 4
    """Assistant turns per episode."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal and refill with new problems (DAPO)."""
    max_refills: int = 2
    """Extra collections a step may make to refill dropped groups."""
    eval_every: int = 25
    """Evaluate every N steps (and at the end); 0: only at the end."""
    eval_samples: int = 8
    """Samples per evaluation problem (pass@1 is their mean; pass@k up to this)."""
    eval_limit: int | None = None
    """Evaluate on the first N test problems only."""
    checkpoint_every: int = 10
    """Save a checkpoint every N steps (and on Ctrl-C and at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint (its settings must agree with the
    saved config.json, but for steps, evaluation, checkpointing, logging and the sampler)."""
    overwrite: bool = False
    """Delete what --out holds and start a new run there (without it, a non-empty --out is
    refused)."""
    sampler: Literal["auto", "vllm", "jax"] = "auto"
    """Rollout engine: vLLM when installed and a GPU is present ("auto"), or forced."""
    vllm_url: str | None = None
    """Use this running vLLM server (started with --enable-lora) instead of launching one."""
    vllm_gpu_memory: float = 0.35
    """GPU memory share of a launched vLLM server; the JAX learner gets most of the rest."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the learner and the JAX sampler (LoRA and optimizer state stay fp32)."""
    remat: bool = True
    """Recompute activations in the backward pass (less memory)."""
    wandb: bool = True
    """Log to Weights & Biases (online with a key, offline otherwise); --no-wandb: off."""
    wandb_project: str = "toolgrpo"
    """Weights & Biases project."""
    export_merged: bool = False
    """Also write the adapter merged into a Hugging Face model directory (out/merged)."""
    seed: int = 0
    """Seed of sampling and problem order."""
    debug: bool = False
    """Show the traceback of an input error instead of its one-line message."""
    allow_cpu: bool = False
    """Run on the CPU even where jax has no access to the machine's GPU or TPU."""

    def __post_init__(self):
        if self.steps < 1 or self.problems_per_step < 1 or self.group_size < 2:
            raise ValueError(f"need steps >= 1, problems_per_step >= 1, group_size >= 2 (GRPO "
                             f"compares episodes of a group); got {self.steps}, "
                             f"{self.problems_per_step}, {self.group_size}")
        if self.micro_batch_size and (self.problems_per_step * self.group_size
                                      ) % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide "
                             f"problems_per_step x group_size")
        positive = {"checkpoint_every": self.checkpoint_every,
                    "keep_checkpoints": self.keep_checkpoints, "max_turns": self.max_turns,
                    "max_turn_tokens": self.max_turn_tokens, "eval_samples": self.eval_samples,
                    "lora_rank": self.lora_rank, "learning_rate": self.learning_rate,
                    "temperature": self.temperature}
        bad = [f"{k}={v}" for k, v in positive.items() if not v > 0]
        bad += [f"{k}={v}" for k, v in {"eval_every": self.eval_every,
                                        "warmup_steps": self.warmup_steps,
                                        "max_refills": self.max_refills}.items() if v < 0]
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)} (counts and rates must be positive; "
                             "eval_every, warmup_steps and max_refills may be 0)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_total_tokens < self.max_turn_tokens:
            raise ValueError(f"max_total_tokens ({self.max_total_tokens}) is smaller than one "
                             f"turn's budget max_turn_tokens ({self.max_turn_tokens})")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out, --overwrite deletes it: "
                             "give one of them")
        if not 0 < self.vllm_gpu_memory < 0.9:
            raise ValueError(f"vllm_gpu_memory must be in (0, 0.9), got {self.vllm_gpu_memory}")


OFFLINE_HINT = ("offline? run with local files: python experiments/aime_grpo.py --model DIR "
                "--problems train.jsonl --eval-problems test.jsonl (or the offline demo: "
                "python experiments/arith_grpo.py)")


def load_config(argv: list[str]) -> Config:
    """Defaults, then a YAML/JSON file (--config PATH or --config=PATH), then command-line
    flags. A file's keys are the settings' names with underscores (max_turn_tokens: 512)."""
    from grpo_loop import fail

    default = Config()
    argv = [x for a in argv for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            fail("--config needs a path to a YAML or JSON file")
        path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
        default = Config(**read_config_file(path))
    return tyro.cli(Config, default=default, args=argv, description=(
        __doc__.split("\n\n")[0] + " Settings also come from a YAML or JSON file, --config PATH "
        "(its keys are the names below with underscores); flags override it."))


def read_config_file(path: str) -> dict:
    """A config file's settings, each checked against its type; errors name the file."""
    import typing

    import yaml

    from grpo_loop import fail

    if not os.path.exists(path):
        fail(f"config file {path} does not exist")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML/JSON: "
                         f"{str(exc).splitlines()[0]}")
    if not isinstance(values, dict):
        fail(f"{path} must map setting names to values")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        fail(f"{path}: unknown settings {unknown} (spell them as the "
                         "dataclass fields, with underscores)")
    for key, value in values.items():
        if not _fits(value, hints[key]):
            expected = getattr(hints[key], "__name__", hints[key])
            fail(f"{path}: {key} is {value!r}, expected {expected}")
    try:
        Config(**values)
    except ValueError as exc:
        fail(f"{path}: {exc}")
    return values


def _fits(value, hint) -> bool:
    """Whether a YAML value fits a setting's type (the types Config uses)."""
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if args and type(None) in args:  # X | None
        return value is None or any(_fits(value, a) for a in args if a is not type(None))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def choose_sampler(cfg: Config) -> str:
    if cfg.sampler != "auto":
        return cfg.sampler
    if cfg.vllm_url:
        return "vllm"
    import importlib.util

    import jax

    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    return "vllm" if has_gpu and importlib.util.find_spec("vllm") else "jax"


def check_context_budget(env, tokenizer, indices, cfg: Config) -> None:
    """A prompt that fills --max-total-tokens leaves nothing to sample: refuse such a budget."""
    from agents.rollout import longest_prompt

    tokens, problem_id = longest_prompt(env, tokenizer, indices)
    if tokens >= cfg.max_total_tokens:
        raise ValueError(
            f"--max-total-tokens {cfg.max_total_tokens} leaves no room to answer: the prompt of "
            f"{problem_id} is {tokens} tokens; raise it above {tokens} (to "
            f"{tokens + cfg.max_turn_tokens} for one full turn)")
    if tokens + cfg.max_turn_tokens > cfg.max_total_tokens:
        print(f"warning: the prompt of {problem_id} is {tokens} tokens, so its first turn gets "
              f"{cfg.max_total_tokens - tokens} of --max-turn-tokens {cfg.max_turn_tokens}",
              file=sys.stderr, flush=True)


def build_learner(cfg: Config):
    """(model with LoRA, GRPOConfig, a fresh TrainState): what a checkpoint of `cfg` restores into."""
    import jax.numpy as jnp
    from flax import nnx

    from learners.lora import apply_lora
    from learners.qwen2 import Qwen2ForCausalLM
    from learners.train import GRPOConfig, init_state

    dtype = getattr(jnp, cfg.dtype)
    model = Qwen2ForCausalLM.from_pretrained(cfg.model, dtype=dtype, param_dtype=dtype,
                                             remat=cfg.remat)
    model = apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, rngs=nnx.Rngs(cfg.seed))
    grpo_cfg = GRPOConfig(learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                          total_steps=cfg.steps, beta=cfg.beta,
                          micro_batch_size=cfg.micro_batch_size)
    return model, grpo_cfg, init_state(model, grpo_cfg)


def main(cfg: Config) -> dict:
    if cfg.sampler != "jax" and not cfg.vllm_url:  # leave vLLM its share of the GPU
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION",
                              f"{0.92 - cfg.vllm_gpu_memory:.2f}")
    import contextlib

    import gymnasium as gym
    import jax
    from flax import nnx
    from tqdm import tqdm

    import envs
    from agents.rollout import RolloutConfig, Rollouts
    from agents.sampler import JaxSampler
    from grpo_loop import (GracefulInterrupt, GRPOLoop, ProblemOrder, RunLog, evaluate, fail,
                           one_line_errors, prepare_run_directory, run_environment,
                           truncate_metrics)
    from learners.checkpoint import Checkpointer
    from learners.devices import unused_accelerator
    from learners.lora import merge_lora, save_peft_adapter
    from learners.params import read_model_config, resolve
    from learners.tokenizer import load_tokenizer

    prepare_run_directory(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite)
    unused = None if cfg.allow_cpu else unused_accelerator()
    if unused:
        fail(unused)
    env_kwargs = {"protocol": cfg.protocol, "max_turns": cfg.max_turns}
    train_kwargs = {**env_kwargs, **({"problems": cfg.problems} if cfg.problems else {})}
    eval_kwargs = {**env_kwargs, "split": "test",
                   **({"problems": cfg.eval_problems} if cfg.eval_problems else {})}
    with one_line_errors(debug=cfg.debug):  # every input checked before the model loads
        read_model_config(resolve(cfg.model))
        tokenizer = load_tokenizer(cfg.model)
        if cfg.env_id not in envs.ENV_IDS:
            raise ValueError(f"--env-id {cfg.env_id!r} is not one of {', '.join(envs.ENV_IDS)}")
        sizes = {}
        for name, kwargs in (("train", train_kwargs), ("eval", eval_kwargs)):
            probe = gym.make(cfg.env_id, **kwargs)  # loads the problems now
            sizes[name] = len(probe.unwrapped.problems)
            check_context_budget(probe, tokenizer, range(min(sizes[name], 4096)), cfg)
            probe.close()
        n_train, n_eval = sizes["train"], min(sizes["eval"], cfg.eval_limit or 10**9)
    engine = choose_sampler(cfg)
    model, grpo_cfg, state = build_learner(cfg)

    with contextlib.ExitStack() as stack:
        if engine == "vllm":
            from agents.vllm_client import VLLMSampler, VLLMServer

            url = cfg.vllm_url or stack.enter_context(VLLMServer(
                cfg.model, max_lora_rank=cfg.lora_rank,
                gpu_memory_utilization=cfg.vllm_gpu_memory,
                extra_args=["--max-model-len", str(cfg.max_total_tokens)])).url
            sampler = VLLMSampler(url, tokenizer, adapter_dir=os.path.join(cfg.out, "adapters"))
            print(f"rollouts: vLLM server at {url}", flush=True)
        else:
            eos = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]
            sampler = JaxSampler(model, tokenizer, eos_token_ids=eos)
            print(f"rollouts: in-process JAX sampler on {jax.devices()[0].platform}"
                  + ("" if cfg.sampler == "jax" else " (vLLM needs a GPU and `pip install "
                     "toolgrpo[vllm]`)"), flush=True)
        roll_cfg = RolloutConfig(group_size=cfg.group_size, max_turn_tokens=cfg.max_turn_tokens,
                                 max_total_tokens=cfg.max_total_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p)
        train = stack.enter_context(Rollouts(lambda: gym.make(cfg.env_id, **train_kwargs),
                                             sampler, tokenizer, roll_cfg))
        evaluator = stack.enter_context(Rollouts(
            lambda: gym.make(cfg.env_id, **eval_kwargs), sampler, tokenizer,
            dataclasses.replace(roll_cfg, group_size=cfg.eval_samples)))
        loop = GRPOLoop(model, state, grpo_cfg, train,
                        cfg.problems_per_step, cfg.dynamic_sampling, cfg.max_refills)
        ckpt = Checkpointer(os.path.join(cfg.out, "checkpoints"), keep=cfg.keep_checkpoints,
                            every=cfg.checkpoint_every)
        position = 0
        if cfg.resume and ckpt.latest_step is not None:
            loop.state, meta, _ = ckpt.restore(loop.state)
            nnx.update(model, loop.state.lora)
            position = int(meta.get("data_position", 0))
            sampler.sync_adapter(model, int(loop.state.step))
            print(f"resumed from step {int(loop.state.step)} in {ckpt.directory}", flush=True)
        elif cfg.resume:
            print(f"--resume: no checkpoint in {ckpt.directory}; starting a new run", flush=True)
        dropped = truncate_metrics(os.path.join(cfg.out, "metrics.jsonl"), int(loop.state.step))
        if dropped:
            print(f"metrics.jsonl: dropped {dropped} records logged after step "
                  f"{int(loop.state.step)} (they are logged again)", flush=True)
        log = RunLog(cfg.out, cfg, wandb_mode="online" if cfg.wandb else "off",
                     project=cfg.wandb_project, resume=cfg.resume)
        problems = ProblemOrder(n_train, seed=cfg.seed, position=position)
        ks = sorted({1, cfg.eval_samples} | ({8} if cfg.eval_samples >= 8 else set()))

        def run_eval(step: int) -> dict:
            metrics, transcripts = evaluate(evaluator, list(range(n_eval)), ks=ks,
                                            seed=cfg.seed + 99 * step,
                                            adapter_version=int(loop.state.step))
            metrics = {f"eval/{k}": v for k, v in metrics.items()}
            log.log(step, metrics)
            log.transcripts(step, transcripts, tag="eval")
            return metrics

        adapter_dir = os.path.join(cfg.out, "adapter")
        adapters_of_checkpoints = os.path.join(cfg.out, "checkpoint_adapters")

        def export_checkpoint_adapter(step: int) -> None:
            """The PEFT adapter of checkpoint `step` (evaluate.py --adapter loads it), written
            once; adapters of checkpoints no longer kept are removed."""
            directory = os.path.join(adapters_of_checkpoints, str(step))
            if not os.path.isdir(directory):
                save_peft_adapter(model, directory, base_model_name_or_path=cfg.model)
            for name in os.listdir(adapters_of_checkpoints):
                if name.isdigit() and int(name) not in ckpt.steps:
                    shutil.rmtree(os.path.join(adapters_of_checkpoints, name))

        start = int(loop.state.step)
        bar = tqdm(range(start + 1, cfg.steps + 1), desc="GRPO", initial=start,
                   total=cfg.steps, dynamic_ncols=True)
        metrics, last_eval = {}, {}
        with GracefulInterrupt() as interrupt:
            for step in bar:
                metrics, batch = loop.step(problems, seed=cfg.seed * 1_000_003 + step)
                # Read once: a Ctrl-C that arrives later in this step is acted on after the next.
                stop = interrupt.requested
                log.log(step, metrics)
                if step % 10 == 1:
                    log.transcripts(step, batch.transcripts[:4])
                meta = {"data_position": problems.position, "adapter_version": step}
                if ckpt.maybe_save(loop.state, meta, force=stop):
                    export_checkpoint_adapter(step)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and not stop:
                    last_eval = run_eval(step)
                bar.set_postfix(reward=f"{metrics.get('train/reward', 0):.3f}",
                                acc=f"{metrics.get('train/accuracy', 0):.3f}",
                                tools=f"{metrics.get('train/tool_use_rate', 0):.2f}")
                if stop:
                    save_peft_adapter(model, adapter_dir, base_model_name_or_path=cfg.model)
                    print(f"saved checkpoint {step} in {ckpt.directory} and its adapter in "
                          f"{adapter_dir}; continue with --resume", flush=True)
                    log.close()
                    raise SystemExit(130)  # the shell's code for a run ended by Ctrl-C
        step = int(loop.state.step)
        ckpt.maybe_save(loop.state, {"data_position": problems.position, "adapter_version": step},
                        force=True)
        export_checkpoint_adapter(step)
        last_eval = run_eval(step)
        save_peft_adapter(model, adapter_dir, base_model_name_or_path=cfg.model)
        if cfg.export_merged:
            merged = merge_lora(nnx.clone(model))
            merged.save_pretrained(os.path.join(cfg.out, "merged"))
            tokenizer.save_pretrained(os.path.join(cfg.out, "merged"))
        log.close()
    summary = {"step": step, **{k: v for k, v in last_eval.items()},
               **{k: v for k, v in metrics.items() if k.startswith("train/")},
               "adapter": adapter_dir, "sampler": engine, "seed": cfg.seed,
               "environment": run_environment()}
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: summary[k] for k in summary if k.startswith("eval/pass@")}))
    return summary


if __name__ == "__main__":
    from grpo_loop import exit_cleanly_when_offline

    config = load_config(sys.argv[1:])
    exit_cleanly_when_offline(lambda: main(config), OFFLINE_HINT)
