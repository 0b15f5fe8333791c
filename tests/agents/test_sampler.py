import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from toolgrpo.agents.sampler import JaxSampler
from toolgrpo.agents.sampling import SamplingParams
from toolgrpo.learners.grpo import token_logprobs

jax.config.update("jax_default_matmul_precision", "highest")
VOCAB = 48


@pytest.fixture(scope="module")
def sampler():
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1")
    model = tiny_model(seed=3, vocab_size=VOCAB, max_position_embeddings=512)
    nnx.update(model, jax.tree.map(lambda x: x + 0.3, nnx.state(model, nnx.LoRAParam)))
    return JaxSampler(model, tokenizer, bucket=16)


PROMPTS = [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]


def test_sampler_logprobs_match_the_learner(sampler):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=1)
    out = sampler.generate(PROMPTS, params, adapter_version=7)
    assert [len(group) for group in out] == [2, 2, 2]
    for prompt, group in zip(PROMPTS, out):
        for s in group:
            assert s.adapter_version == 7 and s.prompt_len == len(prompt)
            seq = jnp.asarray([prompt + s.token_ids])
            learner = np.asarray(token_logprobs(sampler.model(seq), seq))[0, len(prompt) :]
            np.testing.assert_allclose(s.logprobs, learner, atol=1e-4)
            if s.finish_reason == "length":
                assert len(s.token_ids) == 12
            else:
                assert s.finish_reason == "eos" and s.token_ids[-1] == 1


def test_greedy_is_deterministic_and_top_k_one_is_greedy(sampler):
    greedy = sampler.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    again = sampler.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    top1 = sampler.generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=8, seed=5))
    ids = lambda o: [s.token_ids for g in o for s in g]
    assert ids(greedy) == ids(again) == ids(top1)
    seeded = [
        ids(sampler.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=s))) for s in (1, 1, 2)
    ]
    assert seeded[0] == seeded[1] and seeded[0] != seeded[2]


def test_stop_sequences_and_finish_reasons(sampler):
    free = sampler.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=10))[0][0]
    word = sampler.tokenizer.decode([free.token_ids[2]])
    stopped = sampler.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=10, stop=(word,))
    )[0][0]
    first = [sampler.tokenizer.decode([t]) for t in free.token_ids].index(word)
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.text.endswith(word)


@pytest.mark.slow
def test_samples_do_not_depend_on_how_the_batch_is_split(sampler):
    """Shards decoded concurrently draw the random numbers their rows draw in the whole batch."""
    prompts = [[2 + i, 3 + i % 5] for i in range(20)]  # 40 rows: a batch of 64, 8 shards at most
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=20, seed=4)
    whole = JaxSampler(sampler.model, sampler.tokenizer, bucket=16, threads=1)
    split = JaxSampler(sampler.model, sampler.tokenizer, bucket=16, threads=8)
    a, b = whole.generate(prompts, params), split.generate(prompts, params)
    assert [s.token_ids for g in a for s in g] == [s.token_ids for g in b for s in g]
    assert [s.finish_reason for g in a for s in g] == [s.finish_reason for g in b for s in g]
    np.testing.assert_allclose(
        [x for g in a for s in g for x in s.logprobs],
        [x for g in b for s in g for x in s.logprobs],
        atol=1e-5,
    )
    assert len({tuple(s.token_ids) for g in a for s in g}) > 20  # really sampled, not greedy
    with pytest.raises(ValueError, match="threads"):
        JaxSampler(sampler.model, sampler.tokenizer, threads=0)


def test_bad_requests(sampler):
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="positions"):
        sampler.generate([[2] * 10], SamplingParams(max_new_tokens=600))
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_inverse_cdf_draws_follow_the_distribution():
    from toolgrpo.agents.sampler import _inverse_cdf

    rng = np.random.default_rng(0)
    probs = rng.random(70) ** 3  # 70 entries: not a multiple of the 32-entry blocks
    probs[[0, 5, 31, 32, 69]] = 0.0  # block edges and the last entry included
    probs /= probs.sum()
    draws = np.asarray(
        _inverse_cdf(jnp.tile(jnp.asarray(probs, jnp.float32), (100_000, 1)), jax.random.key(1))
    )
    freq = np.bincount(draws, minlength=70) / len(draws)
    assert draws.min() >= 0 and draws.max() < 70
    assert freq[probs == 0].sum() == 0
    assert np.abs(freq - probs).max() < 5 * np.sqrt(probs.max() / len(draws))
    assert 0.5 * np.abs(freq - probs).sum() < 0.01  # total variation
