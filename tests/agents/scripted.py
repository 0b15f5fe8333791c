"""A sampler that writes scripted turns: drives the rollout's tool path without a trained model."""

from toolgrpo.agents.sampling import Sample


class ScriptedSampler:
    """Writes `script(prompt_text, turn)` as each sample's text (tokenized once, as a model's
    tokens would be), with made-up log-probabilities; counts its calls."""

    def __init__(self, tokenizer, script, adapter_version: int = 0):
        self.tokenizer, self.script, self.adapter_version = tokenizer, script, adapter_version
        self.calls = 0

    def sync_adapter(self, model, version: int) -> None:
        """Tag the next samples `version` (there are no weights to load)."""
        self.adapter_version = version

    def recover(self) -> None:
        """Nothing to bring back: it runs in this process (toolgrpo.agents.sampling.Sampler)."""

    def generate(self, prompts, params, adapter_version=None, seeds=None, max_new_tokens=None):
        self.calls += 1
        self.seeds = list(seeds or [])
        out = []
        budgets = max_new_tokens or [params.max_new_tokens] * len(prompts)
        for p, budget in zip(prompts, budgets):
            text = self.tokenizer.decode(p, skip_special_tokens=False)
            turn = text.count("<tool_response>") + text.rpartition("<|im_start|>assistant")[
                2
            ].count("```output")
            ids = self.tokenizer.encode(self.script(text, turn), add_special_tokens=False)
            ids = ids[:budget]
            finish = (
                "eos"
                if ids and ids[-1] == self.tokenizer.eos_token_id
                else (
                    "stop"
                    if any(self.tokenizer.decode(ids).endswith(s) for s in params.stop)
                    else "length"
                )
            )
            version = self.adapter_version if adapter_version is None else adapter_version
            out.append(
                [
                    Sample(
                        ids,
                        [-0.5] * len(ids),
                        self.tokenizer.decode(ids, skip_special_tokens=True),
                        finish,
                        version,
                        len(p),
                    )
                ]
            )
        return out


def force_two_rounds(generate, tokenizer):
    """Round 1 asks the server, then writes a tool call (so that a round 2 follows)."""

    def wrapped(prompts, params, adapter_version=None, **per_prompt):
        groups = generate(prompts, params, adapter_version, **per_prompt)
        ids = tokenizer.encode("```python\nprint(1)\n```\n", add_special_tokens=False)
        return [[Sample(ids, [0.0] * len(ids), "", "stop", g[0].adapter_version)] for g in groups]

    return wrapped


def count_prompts(samplers) -> dict[str, int]:
    """Wrap each sampler's `generate` so that the returned dict counts the prompts sent to it,
    by its `url`."""
    asked = {s.url: 0 for s in samplers}
    for sampler in samplers:
        send = sampler.generate

        def counted(prompts, *args, _send=send, _url=sampler.url, **kw):
            asked[_url] += len(prompts)
            return _send(prompts, *args, **kw)

        sampler.generate = counted
    return asked
