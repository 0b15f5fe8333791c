"""Benchmark one LoRA training step (forward + backward, gradients for the LoRA parameters only):
the Flax model here against transformers + PEFT in PyTorch, on the same shape and data.

    python experiments/bench_learner.py                        # both shapes, a table
    python experiments/bench_learner.py --shapes tiny --json   # one JSON object
    python experiments/bench_learner.py --plan --shapes 0.5b --batch 8 --seq-len 4096 \
        --dtype bfloat16 --json                                # a memory plan: compile, not run
    python experiments/bench_learner.py --plan --shapes 0.5b --target tpu:v5e:2x2
                                                # the same, per chip of a TPU slice (libtpu)

Each framework runs in a subprocess of its own, one after the other in the same run, so that its
peak resident memory (ru_maxrss, imports included) is its own. Step times are medians after
warm-up (JAX's compilation is excluded; it is reported apart). "0.5b-width" is Qwen2.5-0.5B's
width (hidden 896, MLP 4864, 14/2 heads, vocabulary 151936) with 2 layers, to run on a CPU; on a
GPU, "0.5b" is the whole model in bf16, with model FLOP utilisation.

`--plan` measures without running (and without the memory): it compiles, with abstract shapes,
every program one GRPO step of the main job runs on a micro-batch of `--batch` x `--seq-len` (the
update's forward and backward, the optimizer step, and the old- and reference-log-probability
passes where `--ppo-epochs` > 1 and `--beta` > 0 ask for them) for the current backend, and prints
XLA's figures: temporaries, arguments, outputs (GiB) and the compile time of each. With
`--target tpu:v5e:2x2` it compiles them for that TPU slice's chips instead (XLA's TPU compiler
runs on this CPU: libtpu), over the main job's mesh with the state and the micro-batch sharded,
and the figures are per chip, beside the chip's HBM (toolgrpo.learners.plan).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro
from learner_plan import plan_row, print_plan

from toolgrpo.learners.qwen2_config import PRESETS


def preset_shape(preset: str, batch: int = 8, seq_len: int = 1024, rank: int = 128) -> dict:
    """A shape from a Qwen2.5 preset (toolgrpo.learners.qwen2_config.PRESETS)."""
    cfg = PRESETS[preset]()
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "tie_word_embeddings",
    )
    return {**{k: getattr(cfg, k) for k in keys}, "batch": batch, "seq_len": seq_len, "rank": rank}


SHAPES = {
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "batch": 8,
        "seq_len": 128,
        "rank": 16,
    },
    "0.5b-width": {
        "vocab_size": 151_936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 2,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "batch": 2,
        "seq_len": 256,
        "rank": 128,
    },
    "0.5b": {
        "vocab_size": 151_936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "batch": 8,
        "seq_len": 1024,
        "rank": 128,
    },
}
SHAPES["1.5b"] = preset_shape("qwen2p5_1p5b")  # --plan's (meant for a TPU slice or a GPU)
SHAPES["7b"] = preset_shape("qwen2p5_7b")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


@dataclass(frozen=True)
class Args:
    """Learner benchmark settings."""

    shapes: tuple[str, ...] = ("tiny", "0.5b-width")
    """Shapes to measure (see SHAPES); "0.5b", "1.5b" and "7b" are meant for a GPU or --plan."""
    steps: int = 5
    """Timed steps per framework after warm-up."""
    batch: int | None = None
    """Override the shape's batch size."""
    seq_len: int | None = None
    """Override the shape's sequence length."""
    skip_torch: bool = False
    """Measure only the JAX side (for a GPU machine without torch)."""
    seed: int = 0
    """Seed of the weights and the token batch (both sides get the same batch)."""
    json: bool = False
    """Print one JSON object instead of a table."""
    plan: bool = False
    """Compile one step's programs with abstract shapes and print their memory (runs nothing)."""
    dtype: str | None = None
    """Compute dtype: float32 or bfloat16 (default: bfloat16 on a GPU or for --plan, else
    float32). LoRA weights and optimizer state are float32 either way."""
    ppo_epochs: int = 1
    """--plan: the step's optimisation passes (> 1 adds the old-log-probability pass)."""
    beta: float = 0.0
    """--plan: the KL weight (> 0 adds the reference-log-probability pass)."""
    attention_block: int = 512
    """--plan: positions per block of the blockwise attention (the model's attention_block)."""
    logprob_chunk: int = 1024
    """--plan: positions whose logits are computed at once (GRPOConfig.logprob_chunk)."""
    target: str | None = None
    """--plan: compile for a TPU slice instead of this backend, "tpu:TOPOLOGY" ("tpu:v5e:2x2",
    "tpu:v6e:2x4"; needs libtpu: `uv sync --group tpu-compile`, x86-64 Linux): the main job's mesh
    over its chips, state and micro-batch sharded; the figures are per chip."""
    data: int = 1
    """--plan --target: the mesh's data axis (--dist.data of the main job); fsdp takes the rest."""
    worker: str = ""
    """Internal: run one side ("jax:SHAPE" or "torch:SHAPE") and print its figures."""


def shape_of(args: Args, name: str) -> dict:
    shape = dict(SHAPES[name])
    shape["batch"] = args.batch or shape["batch"]
    shape["seq_len"] = args.seq_len or shape["seq_len"]
    return shape


def tokens(shape: dict, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, shape["vocab_size"], (shape["batch"], shape["seq_len"])).astype("int32")


def model_config(shape: dict) -> dict:
    return {k: v for k, v in shape.items() if k not in ("batch", "seq_len", "rank")}


def jax_side(shape: dict, steps: int, seed: int, dtype_name: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from toolgrpo.learners.lora import apply_lora
    from toolgrpo.learners.qwen2 import Qwen2ForCausalLM
    from toolgrpo.learners.qwen2_config import Qwen2Config

    gpu = jax.default_backend() == "gpu"
    dtype = getattr(jnp, dtype_name) if dtype_name else (jnp.bfloat16 if gpu else jnp.float32)
    cfg = Qwen2Config(**model_config(shape), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))
    apply_lora(model, rank=shape["rank"], alpha=shape["rank"])
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    ids = jnp.asarray(tokens(shape, seed))

    def loss_fn(lora, rest, ids):
        logits = nnx.merge(graphdef, lora, rest)(ids)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), ids[:, 1:]
        ).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    t0 = time.perf_counter()
    jax.block_until_ready(step(lora, rest, ids))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(lora, rest, ids))
        times.append(time.perf_counter() - t0)
    out = {
        "step_s": statistics.median(times),
        "compile_s": compile_s,
        "device": jax.devices()[0].device_kind,
        "dtype": str(jnp.dtype(dtype)),
    }
    if gpu:
        stats = jax.devices()[0].memory_stats() or {}
        out["device_peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    return out


def torch_side(shape: dict, steps: int, seed: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**model_config(shape), tie_word_embeddings=True)
    model = get_peft_model(
        Qwen2ForCausalLM(cfg),
        LoraConfig(
            r=shape["rank"],
            lora_alpha=shape["rank"],
            lora_dropout=0.0,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
    )
    ids = torch.tensor(tokens(shape, seed), dtype=torch.long)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
        )
        loss.backward()
        return loss

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "step_s": statistics.median(times),
        "threads": torch.get_num_threads(),
        "version": torch.__version__,
    }


def memory_plan(args: Args, name: str) -> dict:
    """XLA's memory figures for every program of one step at the shape (nothing is allocated),
    compiled for this backend or for `--target`'s TPU slice (per chip; toolgrpo.learners.plan)."""
    import jax.numpy as jnp

    from toolgrpo.learners.plan import abstract_state, plan_step
    from toolgrpo.learners.qwen2_config import Qwen2Config
    from toolgrpo.learners.train import GRPOConfig

    shape = shape_of(args, name)
    dtype = getattr(jnp, args.dtype or "bfloat16")
    cfg = Qwen2Config(**model_config(shape))
    grpo_cfg = GRPOConfig(
        micro_batch_size=shape["batch"],
        ppo_epochs=args.ppo_epochs,
        beta=args.beta,
        total_steps=100,
        logprob_chunk=args.logprob_chunk,
    )
    rank, rows, length = shape["rank"], shape["batch"], shape["seq_len"]
    state = abstract_state(
        cfg, grpo_cfg, rank=rank, dtype=dtype, attention_block=args.attention_block, seed=args.seed
    )
    plan = plan_step(state, grpo_cfg, rows, length, target=args.target, data=args.data)
    return plan_row(
        plan,
        rows=rows,
        length=length,
        rank=rank,
        layers=cfg.num_hidden_layers,
        dtype=str(jnp.dtype(dtype)),
        target=args.target,
    )


def main_plan(args: Args) -> dict:
    report = {"shapes": {name: memory_plan(args, name) for name in args.shapes}}
    headline = report["shapes"][args.shapes[-1]]
    report.update({k: headline[k] for k in ("update_temp_gib", "argument_gib", "compile_s")})
    report["headline_shape"] = args.shapes[-1]
    if args.json:
        print(json.dumps(report))
    else:
        print_plan(report)
    return report


def run_worker(args: Args) -> None:
    side, name = args.worker.split(":")
    shape = shape_of(args, name)
    result = (
        jax_side(shape, args.steps, args.seed, args.dtype)
        if side == "jax"
        else torch_side(shape, args.steps, args.seed)
    )
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(args: Args, side: str, name: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        f"{side}:{name}",
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
    ]
    for flag in ("batch", "seq_len", "dtype"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} benchmark failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args: Args) -> dict:
    report: dict = {"shapes": {}}
    for name in args.shapes:
        shape = shape_of(args, name)
        n_tokens = shape["batch"] * shape["seq_len"]
        jx = measure(args, "jax", name)
        row = {
            "batch": shape["batch"],
            "seq_len": shape["seq_len"],
            "rank": shape["rank"],
            "jax_tokens_per_s": n_tokens / jx["step_s"],
            "jax_peak_mb": jx["peak_rss_mb"],
            "jax_compile_s": jx["compile_s"],
            "device": jx["device"],
        }
        if "device_peak_mb" in jx:
            row["jax_device_peak_mb"] = jx["device_peak_mb"]
            params = _param_count(shape)
            flops = 3 * 2 * params * n_tokens / jx["step_s"]  # 6N per token, the usual convention
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in jx["device"]), None)
            row["model_tflops"] = flops / 1e12
            row["mfu"] = flops / 1e12 / peak if peak else None
        if not args.skip_torch:
            th = measure(args, "torch", name)
            row.update(
                torch_tokens_per_s=n_tokens / th["step_s"],
                torch_peak_mb=th["peak_rss_mb"],
                speed_ratio=th["step_s"] / jx["step_s"],
                memory_ratio=jx["peak_rss_mb"] / th["peak_rss_mb"],
            )
        report["shapes"][name] = row
    first = report["shapes"][args.shapes[-1]]  # the headline: the largest shape asked for
    report.update(
        {
            k: first[k]
            for k in (
                "jax_tokens_per_s",
                "jax_peak_mb",
                "torch_tokens_per_s",
                "torch_peak_mb",
                "speed_ratio",
            )
            if k in first
        }
    )
    report["headline_shape"] = args.shapes[-1]
    report["cpu_count"] = os.cpu_count()
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{'shape':12} {'B x T':>9} {'JAX tok/s':>10} {'torch tok/s':>12} {'speed':>6} "
            f"{'JAX peak':>9} {'torch peak':>11}"
        )
        for name, r in report["shapes"].items():
            print(
                f"{name:12} {r['batch']:>3} x {r['seq_len']:<4} {r['jax_tokens_per_s']:10.0f} "
                f"{r.get('torch_tokens_per_s', float('nan')):12.0f} "
                f"{r.get('speed_ratio', float('nan')):5.2f}x {r['jax_peak_mb']:7.0f}MB "
                f"{r.get('torch_peak_mb', float('nan')):9.0f}MB"
            )
            if "mfu" in r:
                print(
                    f"    {r['device']}: {r['model_tflops']:.1f} TFLOP/s, MFU "
                    f"{(r['mfu'] or 0) * 100:.1f}%"
                )
    return report


def _param_count(shape: dict) -> int:
    d, f, v, n = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["vocab_size"],
        shape["num_hidden_layers"],
    )
    h = d // shape["num_attention_heads"]
    attn = d * d * 2 + 2 * d * shape["num_key_value_heads"] * h
    embeddings = v * d * (1 if shape.get("tie_word_embeddings", True) else 2)  # + lm_head
    return embeddings + n * (attn + 3 * d * f)


if __name__ == "__main__":
    parsed = tyro.cli(Args)
    if parsed.dtype not in (None, "float32", "bfloat16"):
        sys.exit(f"--dtype must be float32 or bfloat16, got {parsed.dtype!r}")
    if parsed.target and not parsed.plan:
        sys.exit("--target goes with --plan (it compiles for a TPU slice; nothing runs)")
    if parsed.worker:
        run_worker(parsed)
    else:
        main_plan(parsed) if parsed.plan else main(parsed)
