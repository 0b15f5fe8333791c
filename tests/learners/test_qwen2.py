"""The Flax Qwen2 against Hugging Face transformers' torch Qwen2ForCausalLM."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny import tiny_base_model
from tiny_qwen import random_batch, torch_logits

from toolgrpo.learners.params import (
    HubUnavailableError,
    from_pretrained,
    read_model_config,
    save_pretrained,
)
from toolgrpo.learners.qwen2_config import PRESETS, Qwen2Config


@pytest.mark.parametrize("pad", [False, True])
def test_logits_match_transformers(hf_model_dir, pad):
    _name, directory, hf = hf_model_dir
    model = from_pretrained(directory)
    ids, mask = random_batch(hf.config.vocab_size, pad=pad)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_logits(hf, ids, mask)
    real = mask.astype(bool)  # padding positions are not compared
    assert np.abs(theirs).max() > 1.0  # random weights give non-trivial logits
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_kv_cache_decode_equals_the_full_forward(hf_model_dir):
    _, directory, hf = hf_model_dir
    model = from_pretrained(directory)
    ids, mask = random_batch(hf.config.vocab_size, batch=3, length=12, seed=1)
    lengths = mask.sum(1)
    prompt_len = 5  # prefill the first 5 positions of every row, then decode the rest
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    logits, cache = model.prefill(
        jnp.asarray(ids[:, :prompt_len]), jnp.ones((3, prompt_len), jnp.int32), max_len=16
    )
    np.testing.assert_allclose(np.asarray(logits), full[:, :prompt_len], atol=1e-4, rtol=1e-4)
    decode = jax.jit(lambda tok, c: model.decode(tok, c))
    for pos in range(prompt_len, ids.shape[1]):
        step_logits, cache = decode(jnp.asarray(ids[:, pos]), cache)
        for row in range(3):
            if pos < lengths[row]:
                np.testing.assert_allclose(
                    np.asarray(step_logits[row]), full[row, pos], atol=1e-4, rtol=1e-4
                )
    assert list(np.asarray(cache.lengths)) == [ids.shape[1]] * 3


def test_decode_after_right_padded_prefill(hf_model_dir):
    """Rows of different prompt lengths in one batch: each decodes at its own position."""
    _, directory, hf = hf_model_dir
    model = from_pretrained(directory)
    ids, mask = random_batch(hf.config.vocab_size, batch=3, length=8, seed=2)
    _, cache = model.prefill(jnp.asarray(ids), jnp.asarray(mask), max_len=12)
    nxt = np.array([5, 7, 11], np.int32)
    step, _ = model.decode(jnp.asarray(nxt), cache)
    for row in range(3):
        n = int(mask[row].sum())
        seq = np.concatenate([ids[row, :n], nxt[row : row + 1]])[None]
        expect = torch_logits(hf, seq, np.ones_like(seq))[0, -1]
        np.testing.assert_allclose(np.asarray(step[row]), expect, atol=1e-4, rtol=1e-4)


def test_save_pretrained_round_trips_into_transformers(hf_model_dir, tmp_path):
    from transformers import Qwen2ForCausalLM as HF

    _, directory, hf = hf_model_dir
    model = from_pretrained(directory)
    save_pretrained(model, str(tmp_path))
    again = HF.from_pretrained(str(tmp_path)).eval()
    ids, mask = random_batch(hf.config.vocab_size, seed=3)
    np.testing.assert_allclose(
        torch_logits(again, ids, mask), torch_logits(hf, ids, mask), atol=1e-5, rtol=1e-5
    )
    reloaded = from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(
        np.asarray(reloaded(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids)))
    )


def test_sharded_bf16_checkpoint_and_separate_compute_dtype(hf_model_dir, tmp_path):
    _, _directory, hf = hf_model_dir
    # a copy: the session's shared model keeps its float32 weights for the tests after this one
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    bf16 = from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    assert bf16.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
    mixed = from_pretrained(str(tmp_path), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert mixed.embed_tokens.embedding.get_value().dtype == jnp.float32
    ids, _ = random_batch(hf.config.vocab_size, pad=False)
    out = mixed(jnp.asarray(ids))
    assert out.dtype == jnp.bfloat16
    ref = torch_logits(hf, ids, np.ones_like(ids))
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1 * np.abs(ref).max()


def test_remat_gives_the_same_logits_and_gradients(hf_model_dir):
    from flax import nnx

    _, directory, hf = hf_model_dir
    ids, mask = random_batch(hf.config.vocab_size, seed=4)
    grads = []
    for remat in (False, True):
        model = from_pretrained(directory, remat=remat)
        loss = lambda m: m(jnp.asarray(ids), jnp.asarray(mask)).mean()
        grads.append(nnx.grad(loss)(model))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_config_conversion_and_presets(hf_model_dir):
    _, directory, _hf = hf_model_dir
    with open(os.path.join(directory, "config.json")) as f:
        cfg = Qwen2Config.from_hf_config(json.load(f))
    assert Qwen2Config.from_hf_config(cfg.to_hf_config()) == cfg
    assert PRESETS["qwen2p5_0p5b"]().num_hidden_layers == 24
    assert not PRESETS["qwen2p5_7b"]().tie_word_embeddings
    with pytest.raises(ValueError, match="multiple"):
        Qwen2Config(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        Qwen2Config.from_hf_config({"model_type": "qwen2", "rope_scaling": {"type": "yarn"}})
    legacy = Qwen2Config.from_hf_config({"model_type": "qwen2", "rope_theta": 5.0})
    assert legacy.rope_theta == 5.0  # transformers 4 configs (as Qwen publishes them)


def test_head_dim_is_always_the_resolved_width(hf_model_dir):
    _, directory, hf = hf_model_dir
    with open(os.path.join(directory, "config.json")) as f:
        saved = json.load(f)
    cfg = Qwen2Config.from_hf_config(saved)
    assert cfg.head_dim == hf.model.layers[0].self_attn.head_dim  # what transformers uses
    assert cfg.to_hf_config()["head_dim"] == cfg.head_dim
    # a config.json without head_dim (as Qwen publishes them): hidden_size // heads
    saved.pop("head_dim", None)
    no_head_dim = Qwen2Config.from_hf_config(saved)
    assert no_head_dim.head_dim == saved["hidden_size"] // saved["num_attention_heads"]
    assert Qwen2Config.from_hf_config(no_head_dim.to_hf_config()) == no_head_dim
    assert Qwen2Config.from_hf_config({**saved, "head_dim": None}) == no_head_dim
    assert Qwen2Config().head_dim == 64 and Qwen2Config(hidden_size=32, head_dim=16).head_dim == 16
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        Qwen2Config(hidden_size=30, num_attention_heads=4, num_key_value_heads=2)
    for bad in (0, 7, -2, 8.0, True):
        with pytest.raises(ValueError, match="head_dim must be an even integer"):
            Qwen2Config(head_dim=bad)  # ty: ignore[invalid-argument-type] - deliberately bad


def test_a_config_json_without_head_dim_loads(tmp_path):
    model = tiny_base_model()  # head width 32 // 4
    save_pretrained(model, str(tmp_path))
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "head_dim"})
    )
    loaded = from_pretrained(str(tmp_path))
    assert loaded.config == model.config and loaded.config.head_dim == 8
    ids = jnp.asarray(random_batch(model.config.vocab_size, pad=False)[0])
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))


def test_the_model_module_does_not_import_the_loaders():
    """toolgrpo.learners.params depends on toolgrpo.learners.qwen2, never the other way round."""
    import subprocess
    import sys

    code = (
        "import sys, toolgrpo.learners.qwen2\n"
        "assert 'toolgrpo.learners.params' not in sys.modules, 'qwen2 imported params'\n"
        "import toolgrpo.learners.params\n"
        "assert toolgrpo.learners.params.Qwen2ForCausalLM is toolgrpo.learners.qwen2.Qwen2ForCausalLM\n"
        "assert not hasattr(toolgrpo.learners.qwen2.Qwen2ForCausalLM, 'from_pretrained')\n"
        "assert not hasattr(toolgrpo.learners.qwen2.Qwen2Config, 'dim')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]


def test_unreachable_hub_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError) as err:
        from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    message = str(err.value)
    assert "\n" not in message and "Qwen/Qwen2.5-0.5B-Instruct" in message
    assert "local directory" in message
    # structured: what could not be had, and what to do offline; the message is the two
    exc = err.value
    assert "Qwen/Qwen2.5-0.5B-Instruct" in exc.reason and "unreachable" in exc.reason
    assert "Offline, pass" not in exc.reason and "\n" not in exc.reason
    assert exc.offline_hint.startswith("Offline, pass a local directory")
    assert message == f"{exc.reason}. {exc.offline_hint}"


def test_broken_model_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_model_config(str(tmp_path))
    (tmp_path / "config.json").write_text('{"vocab_size": 64, "hidden_size": 32,')
    with pytest.raises(ValueError, match="config.json is not valid JSON .line 1"):
        read_model_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 64, "hidden_size": 32}))
    with pytest.raises(ValueError, match="lacks intermediate_size, num_hidden_layers"):
        from_pretrained(str(tmp_path))  # never filled with 0.5B's values
    cfg = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 40,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="no .*safetensors"):
        read_model_config(str(tmp_path))
