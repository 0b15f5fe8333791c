"""toolgrpo.agents.sampling.Sampler: the three samplers of the package satisfy it, at run time
(isinstance) and for ty (the typed assignments below are checked by `ty check`), and they speak
its data contract alike: the same greedy samples of the same base model."""

import pytest
from test_serve import _without_lora

from toolgrpo.agents.sampler import JaxSampler
from toolgrpo.agents.sampling import Sample, Sampler, SamplingParams
from toolgrpo.agents.serve import CompletionService, serve
from toolgrpo.agents.vllm_client import VLLMSampler
from toolgrpo.agents.vllm_pool import VLLMPool


@pytest.fixture(scope="module")
def base_and_url(chat_model, chat_tokenizer):
    """The tiny chat model without its adapter, and an toolgrpo.agents.serve server of it."""
    base = _without_lora(chat_model)
    httpd = serve(CompletionService(base, chat_tokenizer, "tiny-qwen", max_lora_rank=8), port=0)
    yield base, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def test_the_three_samplers_are_samplers_and_sample_alike(base_and_url, chat_tokenizer, tmp_path):
    base, url = base_and_url
    eos = [
        chat_tokenizer.eos_token_id,
        chat_tokenizer.pad_token_id,
    ]  # what toolgrpo.agents.serve stops on
    jax_sampler: Sampler = JaxSampler(base, chat_tokenizer, eos_token_ids=eos)
    vllm_sampler: Sampler = VLLMSampler(url, chat_tokenizer, adapter_dir=str(tmp_path / "one"))
    pool: Sampler = VLLMPool([VLLMSampler(url, chat_tokenizer)], adapter_dir=str(tmp_path / "pool"))
    samplers = {"jax": jax_sampler, "vllm": vllm_sampler, "pool": pool}
    for name, sampler in samplers.items():
        assert isinstance(sampler, Sampler), name
        assert sampler.adapter_version == 0, name
    prompt = chat_tokenizer.encode("Compute 12 x 34.", add_special_tokens=False)
    params = SamplingParams(temperature=0, max_new_tokens=4)
    out = {name: s.generate([prompt], params, seeds=[1]) for name, s in samplers.items()}
    for name, groups in out.items():
        assert len(groups) == 1 and len(groups[0]) == 1, name
        sample = groups[0][0]
        assert isinstance(sample, Sample) and sample.adapter_version == 0, name
        assert sample.prompt_len == len(prompt) and 1 <= len(sample.token_ids) <= 4, name
    tokens = {name: groups[0][0].token_ids for name, groups in out.items()}
    assert tokens["vllm"] == tokens["pool"] == tokens["jax"], tokens


def test_a_class_lacking_recover_is_not_a_sampler():
    class NoRecover:
        adapter_version = 0

        def generate(self, prompts, params, adapter_version=None, *, seeds=None, **kw):
            return []

        def sync_adapter(self, model, version: int) -> None:
            self.adapter_version = version

    class WithRecover(NoRecover):
        def recover(self) -> None:
            pass

    assert not isinstance(NoRecover(), Sampler)
    assert isinstance(WithRecover(), Sampler)
