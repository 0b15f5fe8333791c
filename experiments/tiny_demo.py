"""What the offline demos (experiments/arith_grpo.py, experiments/select_grpo.py) share: the
tiny Qwen2 they build from scratch and the teacher-forced log-probabilities their warm starts
measure."""

from __future__ import annotations

import functools


def tiny_qwen2(tokenizer, hidden_size: int, layers: int, head_dim: int, seed: int):
    """A randomly initialised Qwen2 of `layers` decoder layers, `hidden_size // head_dim` query
    heads and half as many key/value heads, its embeddings tied, over `tokenizer`'s vocabulary."""
    from flax import nnx

    from toolgrpo.learners.qwen2 import Qwen2ForCausalLM
    from toolgrpo.learners.qwen2_config import Qwen2Config

    heads = hidden_size // head_dim
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        rope_theta=10_000.0,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))


@functools.cache
def teacher_forced_logprobs():
    """A jitted (model, tokens [N, T]) -> [N, T] log-probabilities of each token given the ones
    before (0 at position 0)."""
    from flax import nnx

    from toolgrpo.learners.grpo import token_logprobs

    return nnx.jit(lambda model, tokens: token_logprobs(model(tokens), tokens))


def grpo_phase(
    model,
    tokenizer,
    cfg,
    make_train_env,
    make_eval_env,
    log,
    first_problem: int,
    on_warm_start=None,
    rollout: dict | None = None,
    grpo: dict | None = None,
    loop: dict | None = None,
) -> tuple[dict, dict]:
    """A demo's GRPO with LoRA through the JAX sampler, measured on held-out problems before and
    after: (before, after) evaluation metrics. `cfg` is the demo's Config (seed, lora_rank,
    group_size, max_turn_tokens, max_total_tokens, temperature, learning_rate, grpo_steps,
    problems_per_step, eval_problems, eval_samples); `rollout`, `grpo` and `loop` add settings
    to RolloutConfig, GRPOConfig and GRPOLoop. Training problems start at `first_problem` (the
    ones before it were the warm start's); `on_warm_start(before)` runs before the first step.
    Ctrl-C ends the process with 130 (a demo keeps no checkpoints)."""
    import dataclasses

    from flax import nnx

    from toolgrpo.agents.rollout import RolloutConfig, Rollouts
    from toolgrpo.agents.sampler import JaxSampler
    from toolgrpo.agents.training import Evaluation, GRPOLoop, Interrupted, ProblemOrder, fit
    from toolgrpo.learners.lora import apply_lora
    from toolgrpo.learners.train import GRPOConfig, init_state

    model = apply_lora(
        model, rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank, rngs=nnx.Rngs(cfg.seed + 1)
    )
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    sampler = JaxSampler(model, tokenizer, eos_token_ids=eos, bucket=32)
    roll_cfg = RolloutConfig(
        group_size=cfg.group_size,
        max_turn_tokens=cfg.max_turn_tokens,
        max_total_tokens=cfg.max_total_tokens,
        temperature=cfg.temperature,
        pad_to=64,
        sync_rounds=True,  # figures that do not hang on the sandbox's timing
        **(rollout or {}),
    )
    grpo_cfg = GRPOConfig(
        learning_rate=cfg.learning_rate,
        warmup_steps=3,
        total_steps=cfg.grpo_steps,
        schedule="constant",
        micro_batch_size=None,
        **(grpo or {}),
    )
    train = Rollouts(make_train_env, sampler, tokenizer, roll_cfg)
    evaluator = Rollouts(
        make_eval_env,
        sampler,
        tokenizer,
        dataclasses.replace(roll_cfg, group_size=cfg.eval_samples),
    )
    held_out = Evaluation(evaluator, range(cfg.eval_problems), log, seed=10_000)
    before = held_out(0)
    if on_warm_start is not None:
        on_warm_start(before)
    grpo_loop = GRPOLoop(
        model=model,
        state=init_state(model, grpo_cfg),
        cfg=grpo_cfg,
        rollouts=train,
        problems_per_step=cfg.problems_per_step,
        **(loop or {}),
    )
    try:
        fit(
            grpo_loop,
            ProblemOrder(None, position=first_problem),
            log,
            start=0,
            steps=cfg.grpo_steps,
            seed=cfg.seed,
        )
    except Interrupted as stop:
        log.close()
        print(f"stopped after GRPO step {stop.step} (the demo keeps no checkpoints)")
        raise SystemExit(130) from None
    after = held_out(cfg.grpo_steps)
    train.close()
    evaluator.close()
    return before, after
