"""The `search` tool: top-k passages of a corpus, from a local BM25 index or a retrieval server.

    index = BM25Index.from_corpus("corpus.jsonl")        # built once, then loaded from its cache
    tool = search_tool(index, k=3)                       # a Tool: search(query: str) -> text
    server = HTTPRetriever("http://10.0.0.5:8000/retrieve")   # Search-R1's retriever API
    tool = search_tool(server, k=3)

A corpus is a JSONL file of passages, one object a line: {"id": ..., "title": ..., "text": ...}.
The local engine is bm25s (sparse-matrix BM25, numpy only: the corpus's terms scored against a
query in about a millisecond on one core for 100,000 passages, experiments/bench_search.py). Its
index is cached on disk under a key of the corpus file's content hash (sha256) and the index's
settings, so a changed corpus is indexed anew and an unchanged one is loaded.

`HTTPRetriever` speaks the request/response shape of Search-R1's retrieval server, so an index
served elsewhere (a dense Wikipedia index on a GPU machine) plugs in: POST {"queries": [...],
"topk": k, "return_scores": true} to its /retrieve URL, answered by {"result": [[{"document":
{"id": ..., "contents": "<title>\\n<text>"}, "score": s}, ...], ...]}, one list per query.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from toolgrpo.envs.tools.tool import Tool, ToolArgumentError

INDEX_VERSION = 1
"""Part of the cache key: raise it when the tokenization or the index layout changes."""

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    score: float = 0.0


class Retriever(Protocol):
    """Anything that returns the top-k passages of each query, best first."""

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]: ...


class CorpusError(ValueError):
    """A corpus file is missing or not JSONL passages with id, title and text."""


def load_corpus(path: str | os.PathLike) -> list[Passage]:
    """The passages of a JSONL corpus file ({"id", "title", "text"} a line; blank lines skipped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus {str(path)!r} does not exist (a JSONL file of id, title, text)")
    passages = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                passages.append(
                    Passage(str(row["id"]), str(row.get("title", "")), str(row["text"]))
                )
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorpusError(
                    f"{path}:{number}: not a passage ({type(exc).__name__}: {exc}); each line "
                    'must be a JSON object like {"id": "1", "title": "...", "text": "..."}'
                ) from None
    if not passages:
        raise CorpusError(f"corpus {str(path)!r} holds no passage")
    return passages


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> pathlib.Path:
    """$TOOLGRPO_CACHE/search, else $XDG_CACHE_HOME/toolgrpo/search, else ~/.cache/toolgrpo/search."""
    if os.environ.get("TOOLGRPO_CACHE"):
        return pathlib.Path(os.environ["TOOLGRPO_CACHE"]) / "search"
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "toolgrpo" / "search"


@functools.cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def tokenize(text: str) -> list[str]:
    """Lower-cased words of two characters or more, English stop words left out (bm25s's
    default tokenization, without its per-call overhead)."""
    stop = _stopwords()
    return [w for w in _TOKEN.findall(text.lower()) if w not in stop]


class BM25Index:
    """BM25 (bm25s, "lucene" scoring, k1=1.5, b=0.75) over the title and text of passages."""

    def __init__(self, passages: Sequence[Passage], engine, source: str | None = None):
        self.passages, self._engine, self.source = list(passages), engine, source
        """`source`: the corpus file, where there is one."""

    @classmethod
    def build(cls, passages: Sequence[Passage], k1: float = 1.5, b: float = 0.75) -> BM25Index:
        import bm25s
        from bm25s.tokenization import Tokenized

        vocab: dict[str, int] = {}  # word -> id, in order of first use
        ids = [
            [vocab.setdefault(w, len(vocab)) for w in tokenize(f"{p.title} {p.text}")]
            for p in passages
        ]
        engine = bm25s.BM25(k1=k1, b=b)
        engine.index(Tokenized(ids=ids, vocab=vocab), show_progress=False)
        return cls(passages, engine)

    @classmethod
    def from_corpus(
        cls, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
    ) -> BM25Index:
        """The index of a JSONL corpus: loaded from the cache when this corpus (by content hash)
        was indexed before, else built and saved there (`cache_dir`: default_cache_dir())."""
        import bm25s

        passages = load_corpus(path)
        key = cls.cache_key(path)
        where = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cached = where / key
        if (cached / "done").is_file():
            engine = bm25s.BM25.load(str(cached), show_progress=False, verbosity=0)
            return cls(passages, engine, str(path))
        index = cls.build(passages)
        index.source = str(path)
        where.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{key}-", dir=where))
        try:  # written aside, then renamed: a reader never sees half an index
            index._engine.save(str(staging), show_progress=False)
            (staging / "done").write_text(f"{path}\n{len(passages)} passages\n")
            try:
                staging.rename(cached)
            except OSError:  # another process cached it first: keep theirs
                pass
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return index

    @staticmethod
    def cache_key(path: str | os.PathLike) -> str:
        """The name of a corpus's index in the cache: the engine, INDEX_VERSION, its content hash."""
        return f"bm25s-v{INDEX_VERSION}-{file_sha256(path)[:32]}"

    def __len__(self) -> int:
        return len(self.passages)

    def search_one(self, query: str, k: int) -> list[Passage]:
        """The k best passages for `query` with a positive score, best first (ties: corpus order)."""
        ids = self._engine.get_tokens_ids(tokenize(query))
        if not ids or k < 1:
            return []
        scores = np.asarray(self._engine.get_scores_from_ids(ids))
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]
        return [
            Passage(p.id, p.title, p.text, float(scores[i]))
            for i in top
            if scores[i] > 0
            for p in (self.passages[int(i)],)
        ]

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        return [self.search_one(q, k) for q in queries]


class RetrieverError(RuntimeError):
    """A retrieval server could not be reached or answered out of shape."""


class HTTPRetriever:
    """A client of a Search-R1-style retrieval server (`url` ends in /retrieve)."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a retriever URL starts with http:// or https://, got {url!r}")
        self.url, self.timeout_s = url, timeout_s

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        body = json.dumps({"queries": list(queries), "topk": k, "return_scores": True}).encode()
        request = urllib.request.Request(
            self.url, body, {"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise RetrieverError(f"retrieval server {self.url}: {exc}") from exc
        results = reply.get("result") if isinstance(reply, dict) else None
        if not isinstance(results, list) or len(results) != len(queries):
            raise RetrieverError(
                f"retrieval server {self.url}: expected {{'result': [...]}} with one list per "
                f"query ({len(queries)}), got {str(reply)[:200]}"
            )
        return [[_passage(item) for item in result[:k]] for result in results]


def _passage(item) -> Passage:
    """A passage from a Search-R1 result item: {"document": {...}, "score": s}, or the document
    alone (the server's answer without scores). Its "contents" is the title, a newline, the text;
    a server may instead give "title" and "text"."""
    doc = item.get("document", item) if isinstance(item, dict) else None
    if not isinstance(doc, dict):
        raise RetrieverError(f"a retrieval result is not a document: {str(item)[:200]}")
    if "contents" in doc:
        title, _, text = str(doc["contents"]).partition("\n")
    else:
        title, text = str(doc.get("title", "")), str(doc.get("text", ""))
    score = item.get("score", 0.0) if isinstance(item, dict) else 0.0
    return Passage(str(doc.get("id", "")), title.strip().strip('"'), text, float(score))


def format_passages(passages: Sequence[Passage]) -> str:
    """Passages as the model reads them: "Doc 1 (Title: ...) text", one a line."""
    if not passages:
        return "No passage matches the query."
    return "\n".join(f"Doc {i} (Title: {p.title}) {p.text}" for i, p in enumerate(passages, 1))


def search_tool(retriever: Retriever, k: int = 3, name: str = "search") -> Tool:
    """The `search` tool over a retriever: one query, the k best passages as text."""

    def search(query: str) -> str:
        """Search the knowledge base and return the passages that best match the query.

        Args:
            query: What to look for: a few keywords or a question.
        """
        if not query.strip():
            raise ToolArgumentError("the query is empty")
        return format_passages(retriever.search([query], k)[0])

    return Tool.from_function(search, name=name)
