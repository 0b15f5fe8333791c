"""The search tool: a real bm25s index built here over a generated corpus and cached by content
hash, and the HTTP backend against a Search-R1-shaped server started here on 127.0.0.1."""

import http.server
import json
import threading

import pytest

from toolgrpo.envs.tools import (
    BM25Index,
    HTTPRetriever,
    Passage,
    Toolbox,
    parse_tool_calls,
    search_tool,
)
from toolgrpo.envs.tools.search import CorpusError, RetrieverError, format_passages, load_corpus

SYLLABLES = ["ka", "lo", "mi", "ru", "te", "vo", "zu", "ne", "pa", "si"]


def entities(n: int) -> list[tuple[str, str]]:
    """n made-up entity names, each with a code: (name, code)."""
    out = []
    for i in range(n):
        name = "".join(SYLLABLES[(i // 10**j) % 10] for j in range(3)).capitalize() + "ia"
        out.append((name, f"Q{(i * 7919) % 100_000:05d}"))
    return out


def write_corpus(path, n: int = 300) -> list[tuple[str, str]]:
    rows = entities(n)
    with open(path, "w", encoding="utf-8") as f:
        for i, (name, code) in enumerate(rows):
            text = f"{name} is a small town. The registry code of {name} is {code}."
            f.write(json.dumps({"id": f"e{i}", "title": name, "text": text}) + "\n")
            f.write("\n" if i == 5 else "")  # a blank line is skipped
    return rows


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    return path, write_corpus(path)


def test_the_index_finds_each_entity(corpus, tmp_path):
    path, rows = corpus
    index = BM25Index.from_corpus(path, cache_dir=tmp_path / "cache")
    assert len(index) == len(rows)
    for i in (0, 17, 123, 299):
        name, code = rows[i]
        hits = index.search_one(f"what is the registry code of {name}?", k=3)
        assert hits[0].id == f"e{i}" and code in hits[0].text and hits[0].title == name
        assert len(hits) == 3 and hits[0].score > hits[1].score >= hits[2].score > 0
    # by the code, too, and the batch form agrees with single queries
    name, code = rows[42]
    by_code, by_name = index.search([code, name], k=1)
    assert by_code == index.search_one(code, 1) and by_name == index.search_one(name, 1)
    assert by_code[0].id == by_name[0].id == "e42"


def test_no_match_and_k(corpus, tmp_path):
    index = BM25Index.from_corpus(corpus[0], cache_dir=tmp_path / "cache")
    assert index.search_one("xylophone", k=3) == []  # no indexed word
    assert index.search_one("the of is", k=3) == []  # stop words only
    assert index.search_one("town", k=0) == []
    assert len(index.search_one("town registry", k=1000)) == len(index)  # k beyond the corpus


def test_the_index_is_cached_by_content(corpus, tmp_path, monkeypatch):
    path, rows = corpus
    cache = tmp_path / "cache"
    first = BM25Index.from_corpus(path, cache_dir=cache)
    (entry,) = cache.iterdir()
    assert entry.name == BM25Index.cache_key(path) and (entry / "done").is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("the cached index was built again")

    monkeypatch.setattr(BM25Index, "build", no_build)
    again = BM25Index.from_corpus(path, cache_dir=cache)  # loaded, not built
    query = f"registry code of {rows[7][0]}"
    assert again.search_one(query, 3) == first.search_one(query, 3)
    monkeypatch.undo()

    write_corpus(path, n=301)  # a changed corpus is indexed anew, beside the old one
    changed = BM25Index.from_corpus(path, cache_dir=cache)
    assert len(changed) == 301 and len(list(cache.iterdir())) == 2


def test_cache_dir_from_the_environment(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLGRPO_CACHE", str(tmp_path / "elsewhere"))
    BM25Index.from_corpus(corpus[0])
    assert (tmp_path / "elsewhere" / "search" / BM25Index.cache_key(corpus[0]) / "done").is_file()


def test_bad_corpora(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "title": "t", "text": "x"}\n{"id": 2, "title": "no text"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: not a passage \(KeyError"):
        load_corpus(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CorpusError, match="holds no passage"):
        load_corpus(empty)


def test_the_search_tool(corpus, tmp_path):
    path, rows = corpus
    tool = search_tool(BM25Index.from_corpus(path, cache_dir=tmp_path / "cache"), k=2)
    assert tool.name == "search" and list(tool.parameters["properties"]) == ["query"]
    box = Toolbox([tool])
    name, code = rows[5]
    text = '<tool_call>\n{"name": "search", "arguments": {"query": "code of %s"}}\n</tool_call>'
    text += '<tool_call>\n{"name": "search", "arguments": {"query": "  "}}\n</tool_call>'
    text += '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>'
    found, empty, wrong = box.run(parse_tool_calls(text % name).calls)
    assert found.ok and found.output.startswith(f"Doc 1 (Title: {name}) ") and code in found.output
    assert found.output.count("\nDoc ") == 1  # k=2
    assert (empty.status, wrong.status) == ("bad_arguments", "bad_arguments")
    assert (
        "the query is empty" in empty.output
        and "unknown argument(s): q (the arguments are: query); missing required argument(s): query"
        in wrong.output
    )
    assert format_passages([]) == "No passage matches the query."


class RetrievalServer(http.server.ThreadingHTTPServer):
    """A Search-R1-shaped retriever on 127.0.0.1: POST /retrieve {"queries", "topk",
    "return_scores"} -> {"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}."""

    def __init__(self, index: BM25Index, mode: str = "ok"):
        self.index, self.mode, self.requests = index, mode, []
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/retrieve"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_POST(self):
        server = self.server
        assert isinstance(server, RetrievalServer)
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append((self.path, request))
        if server.mode == "error":
            self.send_error(500, "index not loaded")
            return
        results = []
        for query in request["queries"]:
            docs = [
                {"id": p.id, "contents": f'"{p.title}"\n{p.text}'}
                for p in server.index.search_one(query, request["topk"])
            ]
            scores = [p.score for p in server.index.search_one(query, request["topk"])]
            if request.get("return_scores") and server.mode != "no_scores":
                results.append([{"document": d, "score": s} for d, s in zip(docs, scores)])
            else:
                results.append(docs)
        reply = {"result": results if server.mode != "short" else results[:-1]}
        body = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def index(corpus, tmp_path):
    return BM25Index.from_corpus(corpus[0], cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("mode", ["ok", "no_scores"])
def test_http_retriever_speaks_search_r1(index, corpus, mode):
    rows = corpus[1]
    server = RetrievalServer(index, mode)
    try:
        queries = [f"registry code of {rows[3][0]}", rows[250][1]]
        results = HTTPRetriever(server.url).search(queries, k=2)
        assert server.requests == [
            ("/retrieve", {"queries": queries, "topk": 2, "return_scores": True})
        ]
        local = index.search(queries, 2)
        assert [[p.id for p in r] for r in results] == [[p.id for p in r] for r in local]
        first = results[0][0]
        assert (first.title, first.text) == (rows[3][0], local[0][0].text)  # title unquoted
        if mode == "ok":
            assert first.score == pytest.approx(local[0][0].score)
        tool = search_tool(HTTPRetriever(server.url), k=1)
        assert rows[3][1] in tool({"query": f"code of {rows[3][0]}"})
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", ["error", "short"])
def test_http_retriever_faults_are_observations(index, mode):
    server = RetrievalServer(index, mode)
    try:
        with pytest.raises(RetrieverError, match=server.url):
            HTTPRetriever(server.url).search(["a town", "another"], k=2)
        box = Toolbox([search_tool(HTTPRetriever(server.url))])
        call = '<tool_call>{"name": "search", "arguments": {"query": "town"}}</tool_call>'
        (outcome,) = box.run(parse_tool_calls(call).calls)
        assert outcome.status == "error" and "RetrieverError" in outcome.output
    finally:
        server.shutdown()
        server.server_close()


def test_http_retriever_unreachable():
    probe = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = probe.server_address[1]
    probe.server_close()  # nothing listens there now
    with pytest.raises(RetrieverError, match=f"127.0.0.1:{port}"):
        HTTPRetriever(f"http://127.0.0.1:{port}/retrieve", timeout_s=2).search(["x"], k=1)
    with pytest.raises(ValueError, match="starts with http"):
        HTTPRetriever("127.0.0.1:8000/retrieve")


def test_passages_are_values():
    assert Passage("1", "t", "x") == Passage("1", "t", "x", 0.0)
