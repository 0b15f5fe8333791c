"""LoRA against PEFT: adapters written here load in PEFT and the other way round."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_qwen import build_hf_model, random_batch, torch_logits

from toolgrpo.learners.lora import (
    ALL_TARGETS,
    apply_lora,
    load_peft_adapter,
    lora_disabled,
    merge_lora,
    save_peft_adapter,
)
from toolgrpo.learners.params import from_pretrained, save_pretrained


def randomize_lora(model, seed=0):
    leaves = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    new = jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), leaves)
    nnx.update(model, new)


@pytest.mark.slow
def test_fresh_adapter_changes_nothing_and_only_lora_is_trainable(hf_model_dir):
    _, directory, hf = hf_model_dir
    model = from_pretrained(directory)
    ids, mask = random_batch(hf.config.vocab_size)
    before = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    apply_lora(model, rank=4, alpha=8)
    after = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(before, after)
    lora = nnx.state(model, nnx.LoRAParam)
    assert len(jax.tree.leaves(lora)) == 2 * len(ALL_TARGETS) * hf.config.num_hidden_layers
    grads = nnx.grad(lambda m: m(jnp.asarray(ids)).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(
        model
    )
    flat = dict(nnx.to_flat_state(grads))
    assert flat and all(path[-1] in ("lora_a", "lora_b") for path in flat)  # base: no gradient
    # B starts at zero, so only B has a gradient at first
    assert all(float(jnp.abs(v[...]).max()) == 0 for p, v in flat.items() if p[-1] == "lora_a")
    assert any(float(jnp.abs(v[...]).max()) > 0 for p, v in flat.items() if p[-1] == "lora_b")


def test_our_adapter_loads_in_peft_with_the_same_logits(hf_model_dir, tmp_path):
    from peft import PeftModel

    name, directory, hf = hf_model_dir
    model = from_pretrained(directory)
    apply_lora(
        model, rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    )
    randomize_lora(model)
    save_peft_adapter(model, str(tmp_path), base_model_name_or_path=directory)
    peft = PeftModel.from_pretrained(build_hf_model(name), str(tmp_path)).eval()
    ids, mask = random_batch(hf.config.vocab_size, seed=5)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_logits(peft, ids, mask)
    base = torch_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(theirs - base)[real].max() > 0.05  # the adapter really changes the model
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    with lora_disabled(model):  # adapters off: the base model, GRPO's reference
        np.testing.assert_allclose(
            np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[real],
            base[real],
            atol=1e-4,
            rtol=1e-4,
        )
    with open(tmp_path / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_adapter_loads_here_with_the_same_logits(hf_model_dir, tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    name, directory, hf = hf_model_dir
    torch.manual_seed(1)
    peft = get_peft_model(
        build_hf_model(name),
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=list(ALL_TARGETS),
            lora_dropout=0.0,
            init_lora_weights=False,
            use_rslora=rslora,
        ),
    ).eval()  # random A and B
    peft.save_pretrained(str(tmp_path))
    model = load_peft_adapter(from_pretrained(directory), str(tmp_path))
    ids, mask = random_batch(hf.config.vocab_size, seed=6)
    real = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[real],
        torch_logits(peft, ids, mask)[real],
        atol=1e-4,
        rtol=1e-4,
    )
    # and saved again by us, PEFT's tensors come back identical
    save_peft_adapter(model, str(tmp_path / "again"))
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_merged_adapter_exports_a_plain_hugging_face_model(hf_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM as HF

    name, directory, hf = hf_model_dir
    model = apply_lora(from_pretrained(directory), rank=4, alpha=4)
    randomize_lora(model, seed=3)
    save_peft_adapter(model, str(tmp_path / "adapter"))
    merge_lora(model)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    save_pretrained(model, str(tmp_path / "merged"))
    merged = HF.from_pretrained(str(tmp_path / "merged")).eval()
    peft = PeftModel.from_pretrained(build_hf_model(name), str(tmp_path / "adapter")).eval()
    ids, mask = random_batch(hf.config.vocab_size, seed=7)
    real = mask.astype(bool)
    np.testing.assert_allclose(
        torch_logits(merged, ids, mask)[real],
        torch_logits(peft, ids, mask)[real],
        atol=1e-4,
        rtol=1e-4,
    )


def test_bad_lora_requests_are_clear_errors(hf_model_dir, tmp_path):
    _, directory, _ = hf_model_dir
    model = from_pretrained(directory)
    with pytest.raises(ValueError, match="targets"):
        apply_lora(model, targets=("qkv",))
    with pytest.raises(ValueError, match="no LoRA"):
        save_peft_adapter(model, str(tmp_path))
    apply_lora(model, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model)
    os.makedirs(tmp_path / "dora")
    (tmp_path / "dora" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "use_dora": True, "r": 2, "lora_alpha": 2})
    )
    with pytest.raises(ValueError, match="plain LoRA"):
        load_peft_adapter(model, str(tmp_path / "dora"))
