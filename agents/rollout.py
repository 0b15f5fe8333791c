"""Multi-turn tool rollouts with exact tokens: the batch the GRPO learner trains on.

    rollouts = Rollouts(lambda: gym.make("ToolMath-Arith-v0"), sampler, tokenizer, RolloutConfig())
    batch = rollouts.collect(problem_indices=[3, 8], seed=0)   # G episodes for each problem
    state, metrics = grpo_step(state, batch, cfg)

Each episode: the chat template renders the environment's first messages into prompt tokens; the
sampler generates until a tool-call stop sequence, end of sequence or the turn budget; the text of
the turn goes to `env.step`; the observation is tokenized once, here, with the chat template's exact
boundaries and appended with loss mask 0; the episode goes on until the environment ends it.

Token in, token out: the batch holds exactly the tokens the sampler produced (model text is never
re-tokenized); those tokens decode to the chat template's rendering of the environment's
conversation (`RolloutConfig.check_template` verifies it). Each episode samples with its own seed.
An episode whose tokens outgrow `max_total_tokens` ends as truncated ("context"), with reward 0,
never as a crash; a turn's budget is capped to the room its context has left. An episode whose
sandbox server died under a tool call (the environment's info["crashed"]) ends as truncated
("crashed"), and its row carries no loss (its loss mask is zeroed: the fault was not the
model's); the other episodes go on. As RolloutConfig says, episodes with a void turn (SimpleTIR)
or truncated ones (DAPO) lose their loss too, and the soft overlong penalty joins the reward
(agents.shaping).

Generation and tool calls overlap: episodes whose tool call is running sit out the next generation
round while every other episode goes on, so a slow call does not stall the batch. A sampler or
environment error ends the whole collection with that error: there is no partial batch (the
training loop replays a collection whose sampler failed: agents.training.loop).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agents.batch import EpisodeStats, RolloutBatch
from agents.sampling import Sampler, SamplingParams
from agents.shaping import TRUNCATION_MASKS, keeps_loss, overlong_penalty, void_turn


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
    unparseable call, an answer without \\boxed{}; agents.shaping.void_turn). The rewards still
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
    (agents.shaping.overlong_penalty; the length is the episode's whole row, prompt and tool
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


@dataclass
class _Episode:
    group: int
    index: int
    env: Any
    tokens: list[int]
    prompt_len: int
    observation_role: str
    member: int = 0
    """The episode's place in its group (0..group_size-1): part of its sampling seed."""
    tools: Any = None
    """The tool schemas the prompt was rendered with (reset's info["tools"])."""
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turns: int = 0
    void_turns: int = 0
    """Turns that yielded neither a complete tool call nor a final answer (agents.shaping)."""
    cut: bool = False
    """Whether the last turn's generation was cut by its token budget."""
    last_info: dict = field(default_factory=dict)
    stats: EpisodeStats | None = None

    def __post_init__(self):
        self.mask = [0] * len(self.tokens)
        self.logprobs = [0.0] * len(self.tokens)

    def append(
        self, tokens: Sequence[int], sampled: bool, logprobs: Sequence[float] | None = None
    ) -> None:
        """Tokens are only ever appended (or a sampled end-of-turn token taken back, `pop`):
        what the model saw stays exactly what it sees next. Sampled tokens come with their
        log-probabilities."""
        if not sampled:
            logprobs = [0.0] * len(tokens)
        elif logprobs is None:
            raise ValueError("sampled tokens need their log-probabilities")
        self.tokens += list(tokens)
        self.mask += [int(sampled)] * len(tokens)
        self.logprobs += list(logprobs)

    def pop(self) -> None:
        del self.tokens[-1], self.mask[-1], self.logprobs[-1]

    @property
    def ended(self) -> EpisodeStats:
        """The stats of an episode that has ended (`Rollouts._end` set them)."""
        assert self.stats is not None, "the episode has not ended"
        return self.stats

    def seed(self, step_seed: int) -> int:
        """The sampling seed of this episode's next turn: distinct for every (step seed, group,
        problem, member, turn), so the G episodes of a group are independent draws wherever
        the sampler seeds each request (vLLM) and reproducible wherever it runs."""
        return hash((step_seed, self.group, self.index, self.member, self.turns)) % 2**31


def render(tokenizer, messages, tools=None, generation_prompt: bool = False) -> str:
    """The chat template's text for a conversation (and its tool schemas)."""
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
    )


def prompt_tokens(env, tokenizer, index: int) -> tuple[list[int], dict]:
    """The token ids an episode of problem `index` starts from (the chat template's rendering of
    the environment's first messages, with the generation prompt), and the reset's info."""
    _, info = env.reset(options={"index": int(index)})
    text = render(tokenizer, info["messages"], info.get("tools"), generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False), info


def longest_prompt(env, tokenizer, indices: Iterable[int]) -> tuple[int, str]:
    """(tokens, problem id) of the longest prompt among problems `indices`: a context budget
    must leave room after it."""
    longest = (0, "")
    for index in indices:
        tokens, info = prompt_tokens(env, tokenizer, index)
        longest = max(longest, (len(tokens), str(info.get("problem_id", index))))
    return longest


class Rollouts:
    """Plays G episodes per problem through a sampler and collects the rollout batch.

    `make_env()` builds one environment (for example `lambda: gym.make("ToolMath-AIME-v0")`);
    environments are pooled and reused across `collect` calls. The environment must give
    `info["messages"]` (chat form) and `info["stop"]` at reset, like `envs.ToolMathEnv`.
    """

    def __init__(
        self, make_env: Callable[[], Any], sampler: Sampler, tokenizer, cfg: RolloutConfig
    ):
        self.make_env, self.sampler, self.tokenizer, self.cfg = make_env, sampler, tokenizer, cfg
        self._envs: list = []
        self._pool = cf.ThreadPoolExecutor(cfg.tool_workers, thread_name_prefix="rollout-env")
        self._tool_boundary: tuple[str, str] | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for env in self._envs:
            env.close()
        self._envs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the chat template's boundaries ----------------------------------------------------------
    def _render(self, messages, tools=None, generation_prompt=False) -> str:
        return render(self.tokenizer, messages, tools, generation_prompt)

    def _tool_turn(self) -> tuple[str, str]:
        """The text the chat template puts (before, after) a tool message's content when it
        follows an assistant turn: before = end of that turn + start of the tool message,
        after = end of the tool message + the next assistant turn's opening. Read off the
        template itself by rendering a conversation with and without a tool message."""
        if self._tool_boundary is None:
            base = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
            head = self._render(base, generation_prompt=True)
            turn = self._render(base + [{"role": "assistant", "content": "A"}])
            full = self._render(
                base
                + [
                    {"role": "assistant", "content": "A"},
                    {"role": "tool", "content": "\x00TOOL\x00"},
                ],
                generation_prompt=True,
            )
            if not (turn.startswith(head + "A") and full.startswith(turn)):
                raise RolloutError(
                    "the chat template does not render a conversation as a prefix "
                    "of its continuation; tool observations cannot be appended "
                    "exactly"
                )
            before, _, after = full[len(turn) :].partition("\x00TOOL\x00")
            self._tool_boundary = (turn[len(head) + 1 :] + before, after)
        return self._tool_boundary

    def _observation_tokens(self, ep: _Episode, observation: str, turn_ended: bool) -> list[int]:
        if ep.observation_role == "assistant":  # the output continues the assistant's turn
            text = observation
        else:
            before, after = self._tool_turn()
            eos = self.tokenizer.eos_token or ""
            if turn_ended and eos and before.startswith(eos):
                before = before[len(eos) :]  # the model closed its turn itself
            text = before + observation + after
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- collection -------------------------------------------------------------------------------
    def _start(self, env, group: int, index: int, member: int) -> _Episode:
        tokens, info = prompt_tokens(env, self.tokenizer, index)
        role = "tool" if info.get("protocol") == "qwen" else "assistant"
        return _Episode(
            group,
            int(index),
            env,
            tokens,
            len(tokens),
            role,
            member,
            info.get("tools"),
            last_info=info,
        )

    def collect(
        self, problem_indices: Sequence[int], seed: int = 0, adapter_version: int | None = None
    ) -> RolloutBatch:
        """G episodes (cfg.group_size) for each problem index; group i is problem_indices[i]."""
        cfg = self.cfg
        n = len(problem_indices) * cfg.group_size
        if n == 0:
            raise ValueError("collect needs at least one problem index")
        while len(self._envs) < n:
            self._envs.append(self.make_env())
        episodes = [
            self._start(self._envs[g * cfg.group_size + k], g, idx, k)
            for g, idx in enumerate(problem_indices)
            for k in range(cfg.group_size)
        ]
        stop = tuple(episodes[0].last_info.get("stop", ()))
        ready, pending, rounds = list(episodes), {}, 0
        try:
            while ready or pending:
                if pending and cfg.sync_rounds:
                    cf.wait(pending)
                elif pending:  # let tool calls that are about to finish join this round
                    cf.wait(
                        pending,
                        timeout=cfg.batch_wait_s if ready else None,
                        return_when=cf.ALL_COMPLETED if ready else cf.FIRST_COMPLETED,
                    )
                for fut in [f for f in pending if f.done()]:
                    ep, turn_ended = pending.pop(fut)
                    if self._observe(ep, fut.result(), turn_ended):
                        ready.append(ep)
                if not ready:
                    continue
                params = SamplingParams(
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    top_k=cfg.top_k,
                    max_new_tokens=cfg.max_turn_tokens,
                    stop=stop,
                    seed=hash((seed, rounds)) % 2**31,
                )
                rounds += 1
                rooms = [cfg.max_total_tokens - len(ep.tokens) for ep in ready]
                samples = self.sampler.generate(
                    [ep.tokens for ep in ready],
                    params,
                    adapter_version=adapter_version,
                    seeds=[ep.seed(seed) for ep in ready],
                    max_new_tokens=[min(room, cfg.max_turn_tokens) for room in rooms],
                )
                for ep, room, (sample,) in zip(ready, rooms, samples):
                    ep.append(sample.token_ids[:room], True, sample.logprobs[:room])
                    ep.versions.append(sample.adapter_version)
                    ep.turns += 1
                    ep.cut = sample.finish_reason == "length" or len(sample.token_ids) > room
                    if len(sample.token_ids) > room or (
                        room == len(sample.token_ids) and sample.finish_reason == "length"
                    ):
                        ep.void_turns += 1  # cut by the context: the turn is incomplete
                        self._end(ep, truncated="context")
                        continue
                    action = self._action_text(sample)
                    pending[self._pool.submit(ep.env.step, action)] = (
                        ep,
                        sample.finish_reason == "eos",
                    )
                ready = []
        except BaseException as exc:
            for fut in pending:
                fut.cancel()
            cf.wait(pending)  # a running tool call finishes before its environment is closed
            self._drop_envs({id(ep.env) for ep in episodes if ep.stats is None})
            if isinstance(exc, Exception) and not isinstance(exc, (RolloutError, AssertionError)):
                raise RolloutError(f"rollout failed, no batch was made: {exc}") from exc
            raise
        return self._batch(episodes)

    def _action_text(self, sample) -> str:
        """The turn's text as the environment records it: every sampled token but a final
        end-of-turn one, special tokens included, so that the chat template's rendering of the
        environment's messages is the episode's tokens."""
        ids = list(sample.token_ids)
        if sample.finish_reason == "eos" and ids and ids[-1] in self.tokenizer.all_special_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _check_template(self, ep: _Episode) -> None:
        """RolloutConfig.check_template: the episode's tokens decode to the chat template's
        rendering of the environment's conversation, up to its closing end-of-turn (which a
        last turn cut by its token budget never sampled)."""
        info = ep.last_info
        rendered = self._render(info.get("messages", []), ep.tools)
        text = self.tokenizer.decode(ep.tokens, skip_special_tokens=False)
        closing = ("", "\n", f"{self.tokenizer.eos_token or ''}\n")  # a turn cut by its budget
        if not (rendered.startswith(text) and rendered[len(text) :] in closing):
            at = next(
                (i for i, (a, b) in enumerate(zip(text, rendered)) if a != b),
                min(len(text), len(rendered)),
            )
            raise RolloutError(
                f"episode {ep.group}.{ep.member}: its tokens are not the chat template's "
                f"rendering of its conversation; from character {at}: tokens "
                f"{text[at : at + 60]!r}, template {rendered[at : at + 60]!r}"
            )

    def _observe(self, ep: _Episode, step_result, turn_ended: bool) -> bool:
        """Record an environment step; True when the episode goes on."""
        observation, reward, terminated, truncated, info = step_result
        failures = lambda i: int(i.get("tool", {}).get("parse_failures", 0))
        ep.void_turns += void_turn(
            cut=ep.cut,
            parse_failure=failures(info) > failures(ep.last_info),
            final_without_answer=bool(terminated) and info.get("answer") is None,
        )
        ep.last_info = info
        if info.get("crashed"):  # the transcript shows the tool-error output; no turn follows
            self._append_observation(ep, observation, turn_ended)
            self._end(ep, reward=float(reward), truncated="crashed")
            return False
        if terminated or truncated:
            self._end(ep, reward=float(reward), truncated=None if terminated else "turns")
            if self.cfg.check_template:
                self._check_template(ep)
            return False
        if not self._append_observation(ep, observation, turn_ended):  # no room left to answer
            self._end(ep, truncated="context")
            return False
        return True

    def _append_observation(self, ep: _Episode, observation: str, turn_ended: bool) -> bool:
        """Append an observation's tokens (loss mask 0), cut to the room left; True when room
        to answer is left after it."""
        if (
            turn_ended
            and ep.observation_role == "assistant"
            and ep.mask[-1]
            and ep.tokens[-1] in self.tokenizer.all_special_ids
        ):
            # the model ended its turn right after a tool call: the output continues the same
            # assistant message (the chat template has no end of turn there), so the sampled
            # end-of-turn token is taken back
            ep.pop()
        room = self.cfg.max_total_tokens - len(ep.tokens)
        tokens = self._observation_tokens(ep, observation, turn_ended)
        ep.append(tokens[: max(room, 0)], False)
        return len(tokens) < room

    def _end(self, ep: _Episode, reward: float = 0.0, truncated: str | None = None) -> None:
        info = ep.last_info
        tool = info.get("tool", {})
        components = dict(
            (info.get("reward_components") if truncated != "context" else None)
            or {k: 0.0 for k in ("correctness", "format", "tool_use")}
        )
        if self.cfg.overlong_buffer:
            cfg = self.cfg
            components["overlong"] = overlong_penalty(
                len(ep.tokens), cfg.max_total_tokens, cfg.overlong_buffer, cfg.overlong_penalty
            )
            reward += components["overlong"]
        ep.stats = EpisodeStats(
            problem_id=str(info.get("problem_id", ep.index)),
            group=ep.group,
            turns=ep.turns,
            tool_calls=int(tool.get("calls", 0)),
            tool_errors=int(tool.get("errors", 0)),
            tool_timeouts=int(tool.get("timeouts", 0)),
            parse_failures=int(tool.get("parse_failures", 0)),
            answer_found=info.get("answer") is not None and truncated != "context",
            correct=bool(info.get("correct", False)) and truncated != "context",
            truncated=truncated,
            reward=reward,
            reward_components=components,
            sampled_tokens=int(sum(ep.mask)),
            total_tokens=len(ep.tokens),
            answer=None if info.get("answer") is None else str(info["answer"]),
            gold_answer=None if info.get("gold_answer") is None else str(info["gold_answer"]),
            void_turns=ep.void_turns,
        )
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

    def _batch(self, episodes: list[_Episode]) -> RolloutBatch:
        pad = self.cfg.pad_to
        t = -(-max(len(ep.tokens) for ep in episodes) // pad) * pad
        b = len(episodes)
        tokens = np.full((b, t), self.tokenizer.pad_token_id or 0, np.int32)
        mask = np.zeros((b, t), np.int32)
        logprobs = np.zeros((b, t), np.float32)
        # crashed episodes (an infrastructure fault: nothing to learn) and, as configured,
        # those with a void turn or truncated carry no loss
        keep = keeps_loss(
            [ep.ended.truncated for ep in episodes],
            [ep.ended.void_turns for ep in episodes],
            self.cfg.mask_void_turns,
            self.cfg.mask_truncated,
        )
        for i, ep in enumerate(episodes):
            k = len(ep.tokens)
            tokens[i, :k], mask[i, :k], logprobs[i, :k] = ep.tokens, ep.mask, ep.logprobs
            if not keep[i]:
                mask[i], logprobs[i] = 0, 0.0
        return RolloutBatch(
            tokens=tokens,
            loss_mask=mask,
            sampler_logprobs=logprobs,
            rewards=np.asarray([ep.ended.reward for ep in episodes], np.float32),
            group_ids=np.asarray([ep.group for ep in episodes], np.int32),
            adapter_version=np.asarray([min(ep.versions, default=0) for ep in episodes], np.int32),
            lengths=np.asarray([len(ep.tokens) for ep in episodes], np.int32),
            episodes=[ep.ended for ep in episodes],
            transcripts=[
                ep.ended.header()
                + "\n\n"
                + self.tokenizer.decode(ep.tokens, skip_special_tokens=False)
                for ep in episodes
            ],
        )
