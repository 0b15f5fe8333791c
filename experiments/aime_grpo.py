"""The main job: GRPO with LoRA that teaches Qwen2.5-0.5B-Instruct to solve AIME problems with Python.

    python experiments/aime_grpo.py                                  # the defaults
    python experiments/aime_grpo.py --config my.yaml --steps 500     # a file, then flags
    python experiments/aime_grpo.py --resume --out runs/aime_grpo    # continue a run
    python experiments/aime_grpo.py --model.name ./qwen --env.problems aime.jsonl \
        --env.eval-problems a25.jsonl --grpo.eps-high 0.3

Trains on ToolMath-AIME-v0 (AIME 1983-2024) and evaluates on AIME 2025. Rollouts go through vLLM
when it is installed and a GPU is present (a server launched here, or --sampler.vllm-url), else through
the in-process JAX sampler; the choice is printed. Every step: collect problems_per_step x
group_size episodes, optionally drop zero-variance groups and refill (DAPO's dynamic sampling),
one GRPO update of the LoRA adapter, push the adapter to the sampler, log. Every eval.every
steps: pass@1 and pass@k on the test problems. Logs: the run directory (metrics.jsonl, PNG plots,
transcripts), Weights & Biases unless --log.no-wandb. Ctrl-C saves a checkpoint and exits; --resume
continues from the latest one. A rollout server that dies is restarted (launched here) or waited
for (--sampler.vllm-url, up to --sampler.recover-s) and the collection replayed; one that does not
come back ends the run in one line, exit code 5, after the checkpoint of the last step trained. At the end the adapter is exported in PEFT format (and merged into
a Hugging Face model directory with --log.export-merged). Settings: agents/training/config.py
(every one a flag; --help lists them).

How it departs from textbook GRPO (DeepSeekMath): no KL penalty by default (beta 0); clip-higher
(eps_high 0.28, DAPO); dynamic sampling; multi-turn episodes whose tool outputs are masked out of
the loss; rewards from the environment (correct 1.0, boxed answer 0.1, tool ran 0.1).
"""

from __future__ import annotations

import sys

from toolgrpo.agents.training import Config, train
from toolgrpo.agents.training.cli import configure_logging, exit_codes, load_config, one_line_errors

OFFLINE_HINT = (
    "offline? run with local files: python experiments/aime_grpo.py --model.name DIR "
    "--env.problems train.jsonl --env.eval-problems test.jsonl (python experiments/make_tiny.py "
    "--out DIR writes a tiny model and problems to try it; the offline demo: python "
    "experiments/arith_grpo.py)"
)


def main(argv: list[str]) -> dict:
    configure_logging()
    with one_line_errors(debug="--debug" in argv):
        cfg = load_config(argv, Config, description=__doc__.split("\n\n")[0])
    with exit_codes(debug=cfg.debug, offline_hint=OFFLINE_HINT):
        return train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
