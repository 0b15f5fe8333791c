"""Benchmark the search tool's local engine: index build time and queries per second on one core.

    python experiments/bench_search.py                     # 100,000 passages, a table
    python experiments/bench_search.py --json              # one JSON object
    uv run --with tantivy python experiments/bench_search.py --engines bm25s tantivy

The corpus is generated (nothing is downloaded): `--passages` passages of `--words` words each,
drawn from a Zipf-distributed vocabulary of made-up words (as in natural text, a few words are in
most passages and most words in few), with a title of two words. Queries are `--query-words`
words drawn from a random passage, so every query has matches and its frequent words have long
posting lists. The process is pinned to one core (and its math libraries to one thread) before
anything is measured.

Figures, per engine: `build_s` (tokenize and index the corpus: what the first run on a corpus
pays; bm25s's figure includes the cache write that `toolgrpo.envs.tools.search.BM25Index.from_corpus`
does), `load_s` (open the cached index: what later runs pay), and query latency (p50, p99) and
`queries_per_s` over `--queries` single-query calls, one after another, the way a rollout's
search calls arrive (top `--k` passages each); `queries_found` counts those that returned a
passage (all of them should: each query's words come from a passage).
"""

from __future__ import annotations

import os

# one thread for the math libraries, set before numpy is imported
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import datetime  # noqa: E402 (the thread limits above must come before numpy's import)
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import tyro  # noqa: E402

from toolgrpo.envs.tools.search import BM25Index, Passage  # noqa: E402


@dataclass(frozen=True)
class Args:
    """Search benchmark settings."""

    passages: int = 100_000
    """Passages in the generated corpus."""
    words: int = 100
    """Words a passage (Search-R1's Wikipedia passages are about 100 words)."""
    vocabulary: int = 50_000
    """Distinct words of the generated language."""
    queries: int = 2_000
    """Single-query calls measured per engine."""
    query_words: int = 5
    """Words a query."""
    k: int = 3
    """Passages a query returns."""
    engines: tuple[str, ...] = ("bm25s",)
    """Engines to measure: bm25s (the one the search tool uses) and tantivy (needs the tantivy
    package: `uv run --with tantivy ...`)."""
    seed: int = 0
    """Seed of the generated corpus and queries."""
    json: bool = False
    """Print one JSON object instead of a table."""


def made_up_words(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct pronounceable words of 2 to 4 syllables."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["an", "el", "or", "is"]
    words: dict[str, None] = {}
    while len(words) < n:
        parts = rng.integers(len(syllables), size=int(rng.integers(2, 5)))
        words["".join(syllables[i] for i in parts)] = None
    return list(words)


def generated_corpus(args: Args) -> tuple[list[Passage], list[str]]:
    """The passages and the queries (words of random passages)."""
    rng = np.random.default_rng(args.seed)
    vocab = np.asarray(made_up_words(args.vocabulary, rng), dtype=object)
    weights = 1.0 / np.arange(1, args.vocabulary + 1) ** 1.07
    drawn = rng.choice(
        args.vocabulary, size=(args.passages, args.words + 2), p=weights / weights.sum()
    )
    passages = [
        Passage(str(i), " ".join(vocab[row[:2]]).title(), " ".join(vocab[row[2:]]))
        for i, row in enumerate(drawn)
    ]
    queries = []
    for i in rng.integers(args.passages, size=args.queries):
        picks = rng.choice(args.words, size=args.query_words, replace=False) + 2
        queries.append(" ".join(vocab[drawn[i, picks]]))
    return passages, queries


def latency_figures(search, queries: list[str]) -> dict:
    times, found = [], 0
    start = time.perf_counter()
    for q in queries:
        t0 = time.perf_counter()
        found += bool(search(q))
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    times.sort()
    return {
        "queries": len(queries),
        "queries_found": found,
        "p50_ms": statistics.median(times) * 1e3,
        "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3,
        "queries_per_s": len(queries) / total,
    }


def bench_bm25s(passages: list[Passage], queries: list[str], k: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        with open(corpus, "w", encoding="utf-8") as f:
            for p in passages:
                f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n")
        t0 = time.perf_counter()
        BM25Index.from_corpus(corpus, cache_dir=os.path.join(tmp, "cache"))  # builds, caches
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = BM25Index.from_corpus(corpus, cache_dir=os.path.join(tmp, "cache"))  # loads
        load_s = time.perf_counter() - t0
    figures = latency_figures(lambda q: index.search_one(q, k), queries)
    return {"build_s": build_s, "load_s": load_s, **figures}


def bench_tantivy(passages: list[Passage], queries: list[str], k: int) -> dict:
    import tantivy  # ty: ignore[import-not-found] (optional: only `--engines tantivy` needs it)

    builder = tantivy.SchemaBuilder()
    builder.add_text_field("id", stored=True, tokenizer_name="raw")
    builder.add_text_field("title", stored=True)
    builder.add_text_field("text", stored=True)
    schema = builder.build()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index = tantivy.Index(schema, path=tmp)
        writer = index.writer(heap_size=256_000_000, num_threads=1)
        for p in passages:
            writer.add_document(tantivy.Document(id=p.id, title=p.title, text=p.text))
        writer.commit()
        writer.wait_merging_threads()
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = tantivy.Index.open(tmp)
        index.reload()
        searcher = index.searcher()
        load_s = time.perf_counter() - t0

        def search(q: str):
            hits = searcher.search(index.parse_query(q, ["title", "text"]), k).hits
            return [searcher.doc(address)["id"][0] for _score, address in hits]

        figures = latency_figures(search, queries)
    return {"build_s": build_s, "load_s": load_s, **figures}


ENGINES = {"bm25s": bench_bm25s, "tantivy": bench_tantivy}


def main(args: Args) -> dict:
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    if hasattr(os, "sched_setaffinity"):  # one core: the first this process may use
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    t0 = time.perf_counter()
    passages, queries = generated_corpus(args)
    report: dict = {
        "passages": args.passages,
        "words_per_passage": args.words,
        "vocabulary": args.vocabulary,
        "k": args.k,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "corpus_s": time.perf_counter() - t0,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "versions": {},
    }
    for engine in args.engines:
        report["versions"][engine] = importlib.metadata.version(engine)
        report[engine] = ENGINES[engine](passages, queries, args.k)
    return report


if __name__ == "__main__":
    args = tyro.cli(Args)
    report = main(args)
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['passages']} passages x {report['words_per_passage']} words, top {report['k']}"
            f", {report['cores']} core, {report['date']}"
        )
        print(f"{'engine':10} {'build s':>8} {'load s':>7} {'p50 ms':>7} {'p99 ms':>7} {'q/s':>8}")
        for engine in args.engines:
            r = report[engine]
            print(
                f"{engine + ' ' + report['versions'][engine]:10} {r['build_s']:8.2f} "
                f"{r['load_s']:7.2f} {r['p50_ms']:7.3f} {r['p99_ms']:7.3f} "
                f"{r['queries_per_s']:8.0f}"
            )
