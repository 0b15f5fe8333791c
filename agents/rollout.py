"""Multi-turn tool rollouts with exact tokens: the batch the GRPO learner trains on.

    rollouts = Rollouts(lambda: gym.make("ToolMath-Arith-v0"), sampler, tokenizer, RolloutConfig())
    batch = rollouts.collect(problem_indices=[3, 8], seed=0)   # G episodes for each problem
    state, metrics = grpo_step(state, batch, cfg)

Each episode (toolgrpo.agents.episode.Episode): the chat template renders the environment's first
messages into prompt tokens; the sampler generates until a tool-call stop sequence, end of
sequence or the turn budget; the text of the turn goes to `env.step`; the observation is
tokenized once, here, with the chat template's exact boundaries (toolgrpo.agents.chat) and appended with
loss mask 0; the episode goes on until the environment ends it, or `truncation` does.

Token in, token out: the batch holds exactly the tokens the sampler produced (model text is never
re-tokenized); those tokens decode to the chat template's rendering of the environment's
conversation (`RolloutConfig.check_template` verifies it; toolgrpo.agents.chat, "End of turn", says what
becomes of the end-of-turn token). Each episode samples with its own seed. A turn's budget is
capped to the room its context has left; an episode cut by `max_total_tokens` ends as truncated
("context"), with reward 0, never as a crash. An episode whose sandbox server died under a tool
call (the environment's info["crashed"]) ends as truncated ("crashed"), and its row carries no
loss (the fault was not the model's); the other episodes go on. As RolloutConfig says, episodes
with a void turn (SimpleTIR) or truncated ones (DAPO) lose their loss too, and the soft overlong
penalty joins the reward (toolgrpo.agents.shaping).

Generation and tool calls overlap: episodes whose tool call is running sit out the next generation
round while every other episode goes on, so a slow call does not stall the batch. A sampler or
environment error ends the whole collection with that error: there is no partial batch (the
training loop replays a collection whose sampler failed: toolgrpo.agents.training.loop).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from toolgrpo.agents.batch import RolloutBatch
from toolgrpo.agents.chat import action_text, template_mismatch, tool_message_text, tool_turn_text
from toolgrpo.agents.episode import Episode, batch_of
from toolgrpo.agents.sampling import Sample, Sampler, SamplingParams
from toolgrpo.agents.shaping import TRUNCATION_MASKS, keeps_loss, overlong_penalty, void_turn


@dataclass(frozen=True)
class RolloutConfig:
    """How episodes are played."""

    group_size: int = 8
    """Episodes per problem (the GRPO group)."""
    max_turn_tokens: int = 1024
    """Generation budget of one assistant turn."""
    max_total_tokens: int = 4096
    """Context budget of an episode: prompt, every turn and every observation."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    pad_to: int = 64
    """Batch length is rounded up to a multiple of this (fewer learner compilations)."""
    tool_workers: int = 16
    """Threads stepping environments (running tool calls) while generation goes on."""
    batch_wait_s: float = 0.05
    """How long a generation round waits for running tool calls to join it."""
    sync_rounds: bool = False
    """Each generation round waits for every running tool call, so which episodes share a batch,
    and so what they sample, does not depend on how long tool calls take: reproducible runs, at
    the price of waiting for the slowest call of each round."""

    mask_void_turns: bool = False
    """Drop from the loss every episode with a void turn (SimpleTIR, arXiv 2509.02479): a turn
    that yields neither a complete tool call nor a final answer (cut by a token budget, an
    unparseable call, an answer without \\boxed{}; toolgrpo.agents.shaping.void_turn). The rewards still
    count in the group's baseline. Off by default: it also removes the only negative signal
    against such turns, which a small model makes often early on, and SimpleTIR's gain was
    measured on long multi-turn budgets (7B and 32B models); turn it on where gradient-norm
    spikes come with void turns (metric void_episodes)."""
    mask_truncated: Literal["none", "context", "all"] = "none"
    """Drop truncated episodes from the loss (DAPO's overlong filtering, arXiv 2503.14476):
    "context" those cut by max_total_tokens, "all" also those the environment truncated at its
    turn or length limit; "none" (default, as before) trains on them with their reward (0 for
    the correctness part), which teaches to finish within the budget."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: the last this-many tokens of max_total_tokens are a zone
    where the reward falls linearly, from 0 at its start to -overlong_penalty at the budget
    (toolgrpo.agents.shaping.overlong_penalty; the length is the episode's whole row, prompt and tool
    output included, which is what the budget bounds). 0 (default): off. DAPO: 4096 of 20480."""
    overlong_penalty: float = 1.0
    """The penalty at the end of the budget (DAPO: 1, the size of the correctness reward)."""

    check_template: bool = False
    """Check at the end of every episode that its tokens decode to exactly the chat template's
    rendering of the environment's conversation (a RolloutError otherwise): the tests run with
    it; it costs one rendering and one decoding an episode."""

    def __post_init__(self):
        if self.group_size < 1 or self.max_turn_tokens < 1 or self.pad_to < 1:
            raise ValueError(
                f"group_size ({self.group_size}), max_turn_tokens "
                f"({self.max_turn_tokens}) and pad_to ({self.pad_to}) must be >= 1"
            )
        if self.max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be >= 2, got {self.max_total_tokens}")
        # checked here, before a model loads (the sampler's own SamplingParams check them again)
        if not self.temperature >= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"need temperature >= 0 (0: greedy), 0 < top_p <= 1, top_k >= 0 (0: off); got "
                f"temperature {self.temperature}, top_p {self.top_p}, top_k {self.top_k}"
            )
        if self.mask_truncated not in TRUNCATION_MASKS:
            raise ValueError(
                f"mask_truncated must be one of {TRUNCATION_MASKS}, got {self.mask_truncated!r}"
            )
        if not 0 <= self.overlong_buffer <= self.max_total_tokens or self.overlong_penalty < 0:
            raise ValueError(
                f"need 0 <= overlong_buffer <= max_total_tokens ({self.max_total_tokens}) and "
                f"overlong_penalty >= 0, got {self.overlong_buffer}, {self.overlong_penalty}"
            )


class RolloutError(RuntimeError):
    """A rollout could not be completed (the sampler or an environment failed)."""


def truncation(
    room: int,
    model_writes_next: bool,
    *,
    terminated: bool = False,
    env_truncated: bool = False,
    crashed: bool = False,
) -> str | None:
    """Why an episode ends truncated now, or None: the one rule of EpisodeStats.truncated. The
    episode ends when this is not None or its environment terminated it.

    Asked after each turn (`model_writes_next`: the turn was cut by a token budget, so what it
    began is incomplete) and after each environment step (`model_writes_next` True: the
    observation was appended for the model to answer), with the `room` its context has left
    then. In this order:

    "crashed"  the sandbox server died under the tool call (info["crashed"]): the row carries no
               loss, the fault was not the model's (even if the step also terminated);
    None       the environment `terminated` the episode: it ends, not truncated;
    "turns"    the environment truncated it (`env_truncated`: its turn or length limit);
    "context"  the model writes next and no room is left (room <= 0) under max_total_tokens;
    None       otherwise: the episode goes on (a complete turn that fills the context still goes
               to its environment, which may end the episode).
    """
    if crashed:
        return "crashed"
    if terminated:
        return None
    if env_truncated:
        return "turns"
    if model_writes_next and room <= 0:
        return "context"
    return None


class Rollouts:
    """Plays G episodes per problem through a sampler and collects the rollout batch.

    `make_env()` builds one environment (for example `lambda: gym.make("ToolMath-AIME-v0")`);
    environments are pooled and reused across `collect` calls. The environment must give
    `info["messages"]` (chat form) and `info["stop"]` at reset, like `toolgrpo.envs.ToolMathEnv`.
    """

    def __init__(
        self, make_env: Callable[[], Any], sampler: Sampler, tokenizer, cfg: RolloutConfig
    ):
        self.make_env, self.sampler, self.tokenizer, self.cfg = make_env, sampler, tokenizer, cfg
        self._envs: list = []
        self._pool = cf.ThreadPoolExecutor(cfg.tool_workers, thread_name_prefix="rollout-env")
        self._tool_boundary: tuple[str, str, str] | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for env in self._envs:
            env.close()
        self._envs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- collection -------------------------------------------------------------------------------
    def collect(
        self, problem_indices: Sequence[int], seed: int = 0, adapter_version: int | None = None
    ) -> RolloutBatch:
        """G episodes (cfg.group_size) for each problem index; group i is problem_indices[i].

        Every episode that goes on is in one of two places: `writing` (the model writes its next
        turn) or `stepping` (its environment runs the last turn, a tool call, in a worker
        thread). Each round:
        1. take in the environment steps that have finished (`_observe`): the episode ends, or
           its observation is appended and it joins `writing`;
        2. sample one turn for every `writing` episode, in one sampler call (`_sample_turns`);
        3. append each turn (`_take_turn`) and hand it to its environment, unless it ended the
           episode (cut by the context).
        The collection ends when every episode has ended; `truncation` says how each ended.
        """
        episodes = self._start_episodes(problem_indices)
        stop = tuple(episodes[0].last_info.get("stop", ()))
        writing: list[Episode] = list(episodes)
        stepping: dict[cf.Future, Episode] = {}
        rounds = 0
        try:
            while writing or stepping:
                # 1. observations: the steps that have finished, waited for as cfg says
                for done in self._wait_for_steps(stepping, others_write=bool(writing)):
                    ep = stepping.pop(done)
                    if self._observe(ep, done.result()):
                        writing.append(ep)
                if not writing:
                    continue
                # 2. generation: one turn for each episode whose turn it is
                groups = self._sample_turns(writing, seed, rounds, adapter_version, stop)
                rounds += 1
                # 3. actions: each complete turn goes to its environment
                for ep, (sample,) in zip(writing, groups):
                    if self._take_turn(ep, sample):
                        action = action_text(self.tokenizer, sample.token_ids, sample.finish_reason)
                        stepping[self._pool.submit(ep.env.step, action)] = ep
                writing = []
        except BaseException as exc:
            for fut in stepping:
                fut.cancel()
            cf.wait(stepping)  # a running tool call finishes before its environment is closed
            self._drop_envs({id(ep.env) for ep in episodes if ep.stats is None})
            if isinstance(exc, Exception) and not isinstance(exc, (RolloutError, AssertionError)):
                raise RolloutError(f"rollout failed, no batch was made: {exc}") from exc
            raise
        return self._batch(episodes)

    def _start_episodes(self, problem_indices: Sequence[int]) -> list[Episode]:
        """Reset one pooled environment an episode (more are made as needed): G episodes of
        each problem, in group order."""
        g = self.cfg.group_size
        n = len(problem_indices) * g
        if n == 0:
            raise ValueError("collect needs at least one problem index")
        while len(self._envs) < n:
            self._envs.append(self.make_env())
        return [
            Episode.start(self._envs[group * g + member], self.tokenizer, group, index, member)
            for group, index in enumerate(problem_indices)
            for member in range(g)
        ]

    def _wait_for_steps(
        self, stepping: dict[cf.Future, Episode], others_write: bool
    ) -> list[cf.Future]:
        """Wait for running environment steps, then return those that have finished (in the
        order they started). With cfg.sync_rounds: for all of them. Otherwise, when other
        episodes are ready to write (`others_write`), up to cfg.batch_wait_s for the steps about
        to finish to join this round; when none are, for the first to finish."""
        if stepping and self.cfg.sync_rounds:
            cf.wait(stepping)
        elif stepping:
            cf.wait(
                stepping,
                timeout=self.cfg.batch_wait_s if others_write else None,
                return_when=cf.ALL_COMPLETED if others_write else cf.FIRST_COMPLETED,
            )
        return [fut for fut in stepping if fut.done()]

    def _sample_turns(
        self,
        episodes: list[Episode],
        seed: int,
        round_: int,
        adapter_version: int | None,
        stop: tuple[str, ...],
    ) -> list[list[Sample]]:
        """One sample for each episode (a group of one), in one sampler call: each with its own
        seed, and a budget of cfg.max_turn_tokens capped to the room its context has left."""
        cfg = self.cfg
        params = SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=cfg.max_turn_tokens,
            stop=stop,
            seed=hash((seed, round_)) % 2**31,
        )
        return self.sampler.generate(
            [ep.tokens for ep in episodes],
            params,
            adapter_version=adapter_version,
            seeds=[ep.seed(seed) for ep in episodes],
            max_new_tokens=[
                min(ep.room(cfg.max_total_tokens), cfg.max_turn_tokens) for ep in episodes
            ],
        )

    def _take_turn(self, ep: Episode, sample: Sample) -> bool:
        """Append a sampled turn (loss mask 1), cut to the room its context had left; True when
        it goes to the environment, False when it ended the episode (`truncation`)."""
        room = ep.room(self.cfg.max_total_tokens)
        ep.append(sample.token_ids[:room], True, sample.logprobs[:room])
        ep.versions.append(sample.adapter_version)
        ep.turns += 1
        ep.cut = sample.finish_reason == "length" or len(sample.token_ids) > room
        ep.closed_turn = sample.finish_reason == "eos"
        why = truncation(ep.room(self.cfg.max_total_tokens), model_writes_next=ep.cut)
        if why is None:
            return True
        ep.void_turns += 1  # cut: whatever the turn began is incomplete (toolgrpo.agents.shaping)
        self._end(ep, truncated=why)
        return False

    def _observe(self, ep: Episode, step_result) -> bool:
        """Record an environment step: count a void turn, append the observation where the model
        reads it next (or a crashed call's error output, for the transcript), then end the
        episode as `truncation` says; True when it goes on."""
        observation, reward, terminated, truncated, info = step_result
        failures = lambda i: int(i.get("tool", {}).get("parse_failures", 0))
        ep.void_turns += void_turn(
            cut=ep.cut,
            parse_failure=failures(info) > failures(ep.last_info),
            final_without_answer=bool(terminated) and info.get("answer") is None,
        )
        ep.last_info = info
        crashed = bool(info.get("crashed"))
        if crashed or not (terminated or truncated):
            self._append_observation(ep, observation)
        why = truncation(
            ep.room(self.cfg.max_total_tokens),
            model_writes_next=True,
            terminated=bool(terminated),
            env_truncated=bool(truncated),
            crashed=crashed,
        )
        if why is None and not terminated:
            return True
        self._end(ep, reward=0.0 if why == "context" else float(reward), truncated=why)
        return False

    def _append_observation(self, ep: Episode, observation: str) -> None:
        """Append an observation's tokens (loss mask 0), cut to the room its context has left
        (`truncation` then ends the episode)."""
        if ep.closed_turn and ep.observation_role == "assistant":
            # the output continues the assistant's message, where the chat template has no end
            # of turn: the one the model sampled is taken back (toolgrpo.agents.chat, "End of turn")
            ep.take_back_end_of_turn(self.tokenizer.all_special_ids)
        tokens = self._observation_tokens(ep, observation, ep.closed_turn)
        ep.append(tokens[: max(ep.room(self.cfg.max_total_tokens), 0)], False)

    def _end(self, ep: Episode, reward: float = 0.0, truncated: str | None = None) -> None:
        """End the episode (its stats); with cfg.check_template, check the tokens of one that
        its environment ended; release the environment of one cut mid-episode by the context."""
        cfg = self.cfg
        overlong = None
        if cfg.overlong_buffer:
            overlong = overlong_penalty(
                len(ep.tokens), cfg.max_total_tokens, cfg.overlong_buffer, cfg.overlong_penalty
            )
        ep.finish(reward, truncated, overlong)
        if truncated in (None, "turns") and cfg.check_template:
            self._check_template(ep)
        if truncated == "context":  # the environment is mid-episode: release what it holds
            self._drop_envs({id(ep.env)})

    def _drop_envs(self, ids: set[int]) -> None:
        keep = []
        for env in self._envs:
            if id(env) in ids:
                env.close()
            else:
                keep.append(env)
        self._envs = keep

    # -- the chat template's boundaries (toolgrpo.agents.chat) -------------------------------------------
    def _tool_turn(self) -> tuple[str, str, str]:
        """The template's text around a tool message (toolgrpo.agents.chat.tool_turn_text), read once."""
        if self._tool_boundary is None:
            boundary = tool_turn_text(self.tokenizer)
            if boundary is None:
                raise RolloutError(
                    "the chat template does not render a conversation as a prefix "
                    "of its continuation; tool observations cannot be appended "
                    "exactly"
                )
            self._tool_boundary = boundary
        return self._tool_boundary

    def _observation_tokens(self, ep: Episode, observation: str, closed_turn: bool) -> list[int]:
        """The tokens an observation appends: the output alone where it continues the
        assistant's message, else the output as a tool message (toolgrpo.agents.chat, "End of turn")."""
        if ep.observation_role == "assistant":
            text = observation
        else:
            # a turn with several calls has one tool message a call (the environment's
            # info["tool_outputs"], as ToolUseEnv gives them); otherwise the observation is one
            outputs = ep.last_info.get("tool_outputs") or [observation]
            text = tool_message_text(self.tokenizer, self._tool_turn(), outputs, closed_turn)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_template(self, ep: Episode) -> None:
        """RolloutConfig.check_template: the episode's tokens decode to the chat template's
        rendering of the environment's conversation (toolgrpo.agents.chat.template_mismatch)."""
        where = template_mismatch(
            self.tokenizer, ep.tokens, ep.last_info.get("messages", []), ep.tools
        )
        if where is not None:
            raise RolloutError(
                f"episode {ep.group}.{ep.member}: its tokens are not the chat template's "
                f"rendering of its conversation; {where}"
            )

    def _batch(self, episodes: list[Episode]) -> RolloutBatch:
        """The batch of the ended episodes. Crashed ones (an infrastructure fault: nothing to
        learn) and, as configured, those with a void turn or truncated carry no loss."""
        keep = keeps_loss(
            [ep.ended.truncated for ep in episodes],
            [ep.ended.void_turns for ep in episodes],
            self.cfg.mask_void_turns,
            self.cfg.mask_truncated,
        )
        return batch_of(episodes, keep, self.cfg.pad_to, self.tokenizer)
