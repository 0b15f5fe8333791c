"""The parts a run is made of, from its config: the learner (the model with LoRA, its
TrainState) and the rollout engine (a vLLM server or the in-process JAX sampler)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Generator

from toolgrpo.agents.sampling import Sampler
from toolgrpo.agents.training.config import Config

logger = logging.getLogger(__name__)


def choose_engine(cfg: Config) -> str:
    """ "vllm" or "jax": the configured engine, or for "auto" vLLM where it is installed and a GPU
    is present (or a server URL is given)."""
    if cfg.sampler.engine != "auto":
        return cfg.sampler.engine
    if cfg.sampler.vllm_url:
        return "vllm"
    import importlib.util

    import jax

    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    return "vllm" if has_gpu and importlib.util.find_spec("vllm") else "jax"


def build_learner(cfg: Config):
    """(model with LoRA, GRPOConfig, a fresh TrainState): what a checkpoint of `cfg` restores
    into."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from toolgrpo.learners.lora import apply_lora
    from toolgrpo.learners.params import from_pretrained
    from toolgrpo.learners.train import init_state

    dtype = getattr(jnp, cfg.model.compute_dtype(jax.default_backend()))
    model = from_pretrained(
        cfg.model.name,
        dtype=dtype,
        param_dtype=dtype,
        remat=cfg.model.remat,
        attention=cfg.model.attention,
        attention_block=cfg.model.attention_block,
    )
    model = apply_lora(
        model, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha, rngs=nnx.Rngs(cfg.seed)
    )
    grpo_cfg = cfg.grpo_for_run()
    return model, grpo_cfg, init_state(model, grpo_cfg)


@contextlib.contextmanager
def open_sampler(cfg: Config, engine: str, model, tokenizer) -> Generator[Sampler]:
    """The rollout engine of `cfg`: a vLLM server (given, or launched here and stopped on exit)
    or the in-process JAX sampler."""
    with contextlib.ExitStack() as stack:
        if engine == "vllm":
            from toolgrpo.agents.vllm_client import VLLMSampler
            from toolgrpo.agents.vllm_pool import VLLMPool
            from toolgrpo.agents.vllm_server import VLLMServer

            server = None
            urls = tuple(cfg.sampler.vllm_url)
            if not urls:  # launched here: restarted if it dies
                server = stack.enter_context(
                    VLLMServer(
                        cfg.model.name,
                        max_lora_rank=cfg.model.lora_rank,
                        gpu_memory_utilization=cfg.sampler.vllm_gpu_memory,
                        extra_args=["--max-model-len", str(cfg.rollout.max_total_tokens)],
                    )
                )
                urls = (server.url,)
            logger.info(
                "rollouts: vLLM server%s at %s", "s" if len(urls) > 1 else "", ", ".join(urls)
            )
            adapters = os.path.join(cfg.out, "adapters")
            clients = [
                VLLMSampler(
                    url,
                    tokenizer,
                    adapter_dir=adapters,
                    server=server,
                    recover_s=cfg.sampler.recover_s,
                )
                for url in urls
            ]
            yield clients[0] if len(clients) == 1 else VLLMPool(clients, adapter_dir=adapters)
        else:
            import jax

            from toolgrpo.agents.sampler import JaxSampler

            eos = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]
            logger.info(
                "rollouts: in-process JAX sampler on %s%s",
                jax.devices()[0].platform,
                ""
                if cfg.sampler.engine == "jax"
                else " (vLLM needs a GPU and `pip install toolgrpo[vllm]`)",
            )
            yield JaxSampler(model, tokenizer, eos_token_ids=eos)
