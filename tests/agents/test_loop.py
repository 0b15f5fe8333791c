"""GRPOLoop.collect: dynamic sampling gives one batch shape, problems_per_step x group_size rows,
whatever the rewards (trimmed, or completed with filler that adds nothing to the loss).
GRPOLoop.restore: a loop restored from a checkpoint continues as the one that wrote it."""

from types import SimpleNamespace

import numpy as np
import pytest

from toolgrpo.agents.batch import EpisodeStats, RolloutBatch
from toolgrpo.agents.rollout import RolloutConfig
from toolgrpo.agents.training.loop import GRPOLoop, ProblemOrder


def episode(problem: int, group: int, reward: float) -> EpisodeStats:
    return EpisodeStats(
        problem_id=str(problem),
        group=group,
        turns=1,
        tool_calls=0,
        tool_errors=0,
        tool_timeouts=0,
        parse_failures=0,
        answer_found=True,
        correct=reward > 0,
        truncated=None,
        reward=reward,
        reward_components={"correctness": reward},
        sampled_tokens=4,
        total_tokens=8,
    )


class StubRollouts:
    """Rollouts whose rewards are set by the problem id: a group is informative (rewards 0 and
    1 alternating) when its problem is in `varied`, uniform (all 1) otherwise. Tokens are random
    ids of the tiny model's vocabulary; the last `sampled` tokens of a row are the sampled ones.
    `sampler` is its sampler (default: one that takes any adapter and stays at version 0)."""

    def __init__(
        self,
        varied,
        group_size: int = 2,
        length: int = 8,
        sampled: int = 4,
        vocab: int = 32,
        sampler=None,
    ):
        self.varied, self.length, self.sampled, self.vocab = set(varied), length, sampled, vocab
        self.cfg = RolloutConfig(group_size=group_size)
        self.tokenizer = SimpleNamespace(pad_token_id=0)
        self.sampler = sampler or SimpleNamespace(
            sync_adapter=lambda model, version: None, adapter_version=0
        )
        self.asked: list[list[int]] = []

    def collect(self, problem_ids, seed=0, adapter_version=None) -> RolloutBatch:
        self.asked.append(list(problem_ids))
        g = self.cfg.group_size
        rng = np.random.default_rng(seed)
        b = len(problem_ids) * g
        mask = np.zeros((b, self.length), np.int32)
        mask[:, -self.sampled :] = 1
        rewards = np.asarray(
            [float(k % 2 if p in self.varied else 1) for p in problem_ids for k in range(g)],
            np.float32,
        )
        groups = np.repeat(np.arange(len(problem_ids)), g).astype(np.int32)
        return RolloutBatch(
            tokens=rng.integers(1, self.vocab, (b, self.length)).astype(np.int32),
            loss_mask=mask,
            sampler_logprobs=np.where(mask > 0, -1.0, 0.0).astype(np.float32),
            rewards=rewards,
            group_ids=groups,
            adapter_version=np.full(b, adapter_version or 0, np.int32),
            lengths=np.full(b, self.length, np.int32),
            episodes=[
                episode(p, i, rewards[i * g + k])
                for i, p in enumerate(problem_ids)
                for k in range(g)
            ],
            transcripts=[""] * b,
        )


class VersionedSampler:
    """A sampler stub that records the adapter versions it is given."""

    def __init__(self):
        self.adapter_version, self.synced = 0, []

    def sync_adapter(self, model, version):
        self.synced.append(version)
        self.adapter_version = version


def loop_of(rollouts, problems_per_step=4, max_refills=2) -> GRPOLoop:
    return GRPOLoop(
        model=None,  # ty: ignore[invalid-argument-type] - collect never updates
        state=SimpleNamespace(updates=0, lora=None),  # ty: ignore[invalid-argument-type] - a stub
        cfg=None,  # ty: ignore[invalid-argument-type] - collect never updates
        rollouts=rollouts,
        problems_per_step=problems_per_step,
        dynamic_sampling=True,
        max_refills=max_refills,
    )


def problems_of(batch: RolloutBatch) -> list[int]:
    return [int(e.problem_id) for e in batch.episodes[::2]]


def test_extra_informative_groups_are_trimmed_to_problems_per_step():
    # problems 0..3 (2 informative), then 4..7 (all informative): 6 found, 4 kept, in order
    rollouts = StubRollouts(varied={1, 3, 4, 5, 6, 7})
    batch, stats = loop_of(rollouts).collect(ProblemOrder(None), seed=0)
    assert batch.tokens.shape == (8, 8) and len(batch.episodes) == 8
    assert problems_of(batch) == [1, 3, 4, 5]
    assert (stats["refills"], stats["filler_groups"], stats["collected_groups"]) == (1, 0, 8)
    assert batch.informative_rows().all() and (batch.loss_mask.sum(1) == 4).all()
    assert len(set(batch.group_ids)) == 4  # one id a group (not necessarily 0..3)


def test_too_few_informative_groups_are_completed_by_filler_without_loss():
    # one informative group a collection, two collections: 2 found, 2 filler groups
    rollouts = StubRollouts(varied={2, 5})
    batch, stats = loop_of(rollouts, max_refills=1).collect(ProblemOrder(None), seed=0)
    assert batch.tokens.shape[0] == 8 and rollouts.asked == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert (stats["refills"], stats["filler_groups"], stats["informative_groups"]) == (1, 2, 2)
    assert problems_of(batch) == [2, 5, 0, 1]  # informative first, then the first uniform ones
    assert (batch.loss_mask[:4].sum(1) == 4).all() and not batch.loss_mask[4:].any()
    assert not batch.sampler_logprobs[4:].any()
    assert len(set(batch.group_ids)) == 4 and "all_groups_uniform" not in stats


def test_all_uniform_groups_give_a_full_batch_of_filler():
    rollouts = StubRollouts(varied=set())
    batch, stats = loop_of(rollouts).collect(ProblemOrder(None), seed=0)
    assert batch.tokens.shape[0] == 8 and not batch.loss_mask.any()
    assert (stats["filler_groups"], stats["refills"], stats["all_groups_uniform"]) == (4, 2, 1)
    assert problems_of(batch) == [0, 1, 2, 3]


@pytest.mark.slow
def test_every_step_has_the_same_batch_shape_and_filler_adds_nothing_to_the_update():
    """Steps with 4, 1 and 1 informative groups train on batches of one shape (micro-batches of
    one group divide it every time); the loss and gradient norm of a batch with filler are those
    of its informative group alone: the filler rows are masked out of the per-sequence mean (a
    filler row that counted would scale the loss by informative/all rows, 2/8 here)."""
    from tiny import tiny_model

    from toolgrpo.learners.train import GRPOConfig, grpo_step, init_state

    cfg = GRPOConfig(learning_rate=1e-3, schedule="constant", micro_batch_size=2)
    model = tiny_model(lora_seed=1)
    state = init_state(model, cfg)
    rollouts = StubRollouts(varied={0, 1, 2, 3, 4, 9})
    loop = loop_of(rollouts, max_refills=0)
    order = ProblemOrder(None)
    shapes = []
    for step in range(3):  # problems 0-3: 4 informative, 4-7: 1, 8-11: 1
        batch, stats = loop.collect(order, seed=step)
        shapes.append(batch.tokens.shape)
        state, metrics = grpo_step(state, batch, cfg)
        assert np.isfinite(metrics["loss"])
    assert shapes == [(8, 8)] * 3 and stats["filler_groups"] == 3

    fresh = init_state(tiny_model(lora_seed=1), cfg)
    _, with_filler = grpo_step(fresh, batch, cfg)
    _, alone = grpo_step(fresh, batch.select(np.arange(8) < 2), cfg)
    for key in ("loss", "grad_norm"):
        # the same rows' float32 sums plus exact zeros: rounding apart (~1e-7), equal
        assert with_filler[key] == pytest.approx(alone[key], rel=1e-5, abs=1e-9), key
    assert alone["grad_norm"] > 0


@pytest.mark.slow
def test_a_loop_restored_from_a_checkpoint_continues_as_the_one_that_wrote_it(tmp_path):
    """Two steps, a checkpoint (a real Checkpointer round trip), a third step. A new loop
    restored from the checkpoint holds what the original held after step 2 (its adapter in the
    state and the model, its problem position, the sampler synced to version 2); its step 3
    trains on the original's problems to the original's parameters, bit for bit."""
    import jax
    from flax import nnx
    from tiny import tiny_model

    from toolgrpo.learners.checkpoint import Checkpointer
    from toolgrpo.learners.train import GRPOConfig, init_state

    cfg = GRPOConfig(learning_rate=1e-3, schedule="constant", micro_batch_size=2)

    def new_loop() -> tuple[GRPOLoop, StubRollouts, VersionedSampler]:
        sampler = VersionedSampler()
        rollouts = StubRollouts(varied=set(range(0, 40, 3)), sampler=sampler)
        model = tiny_model(lora_seed=1)
        loop = GRPOLoop(
            model=model,
            state=init_state(model, cfg),
            cfg=cfg,
            rollouts=rollouts,  # ty: ignore[invalid-argument-type] - a stub of Rollouts
            problems_per_step=4,
        )
        return loop, rollouts, sampler

    def arrays(loop: GRPOLoop) -> list[np.ndarray]:
        trees = (loop.state.lora, loop.state.opt_state, nnx.state(loop.model, nnx.LoRAParam))
        return [np.asarray(x) for x in jax.tree.leaves(trees)]

    original, played, _ = new_loop()
    order = ProblemOrder(40, seed=3)
    for step in (1, 2):
        original.step(order, seed=step)
    ckpt = Checkpointer(str(tmp_path), keep=1)
    ckpt.save(2, original.state, {"data_position": original.data_position})
    after_2 = arrays(original)
    original.step(order, seed=3)

    loop, rollouts, sampler = new_loop()
    state, meta, _ = ckpt.restore(loop.state)
    loop.restore(state, data_position=int(meta["data_position"]))
    assert (loop.adapter_version, loop.data_position) == (2, 8)
    assert (sampler.adapter_version, sampler.synced) == (2, [2])
    for a, b in zip(arrays(loop), after_2, strict=True):
        np.testing.assert_array_equal(a, b)
    loop.step(ProblemOrder(40, seed=3, position=loop.data_position), seed=3)
    assert rollouts.asked == played.asked[2:]  # step 3's problems
    assert (loop.data_position, sampler.adapter_version) == (12, 3)
    assert any((a != b).any() for a, b in zip(arrays(loop), after_2, strict=True))  # it learned
    for a, b in zip(arrays(loop), arrays(original), strict=True):
        np.testing.assert_array_equal(a, b)
