"""model.data: every format on small files in its real layout, splits and popularity against
hand-worked examples, the disk cache, and the error messages for bad input."""
import dataclasses
import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import leaky_test_items
from model.config import PROJECT_ROOT as REPO_ROOT
from model.config import dataset_config_from_dict, resolve_dataset
from model.data import POPULARITY_GROUPS, SequenceData, load_dataset, main, pad_left
from model.datasets import ML100K_MEMBER
from model.errors import ConfigError, DataError

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_gz(path: Path, text: str) -> str:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def load(tmp_path):
    """load(settings) -> SequenceData, with the cache in the test's own folder."""
    def load_settings(settings: dict) -> SequenceData:
        settings = {"cache_dir": str(tmp_path / "cache"), **settings}
        return load_dataset(dataset_config_from_dict(settings, "test.yaml"))
    return load_settings


def as_lists(data: SequenceData) -> list[list[int]]:
    return [seq.tolist() for seq in data.sequences]


# ---------------------------------------------------------------- hand-worked example

# (user, item, time) in file order; ties: u2's A and C at 20, u3's A and C at 60,
# and u1's A with u2's B at 10. Stable time order:
# (u3,B,5) (u1,A,10) (u2,B,10) (u1,B,20) (u2,A,20) (u2,C,20) (u1,C,30) (u1,D,40) (u2,E,50)
# (u3,A,60) (u3,C,60) -> items B=1 A=2 C=3 D=4 E=5, users u3 u1 u2:
# u3 [1,2,3]   u1 [2,1,3,4]   u2 [1,2,3,5]
HAND_CSV = """user,item,time
u1,A,10
u2,B,10
u1,B,20
u1,C,30
u1,D,40
u2,A,20
u2,C,20
u2,E,50
u3,B,5
u3,A,60
u3,C,60
"""


@pytest.fixture
def hand(tmp_path, load) -> SequenceData:
    return load({"format": "csv", "interactions": write(tmp_path / "i.csv", HAND_CSV),
                 "user_column": "user", "item_column": "item", "time_column": "time"})


def test_hand_example_numbering_and_stable_time_order(hand):
    assert as_lists(hand) == [[1, 2, 3], [2, 1, 3, 4], [1, 2, 3, 5]]
    assert hand.user_ids.tolist() == ["u3", "u1", "u2"]
    assert hand.item_ids.tolist() == ["B", "A", "C", "D", "E"]
    assert hand.n_items == 5 and hand.item_texts is None and hand.embeddings_path is None


def test_equal_times_keep_file_order_at_scale(tmp_path, load):
    # enough rows that an unstable sort (numpy's default) would reorder the ties
    rng = np.random.default_rng(0)
    items, users = rng.permutation(300), rng.integers(0, 3, 300)
    rows = "".join(f"u{u},i{i},7\n" for u, i in zip(users, items))
    data = load({"format": "csv", "interactions": write(tmp_path / "t.csv",
                                                        "user_id,item_id,timestamp\n" + rows)})
    for user, seq in zip(data.user_ids, data.sequences):
        assert data.item_ids[seq - 1].tolist() == [f"i{i}" for i in items[users == int(user[1:])]]


def test_hand_example_splits(hand):
    assert [s.tolist() for s in hand.train_sequences()] == [[2, 1], [1, 2]]  # len >= 4 only
    histories, targets = hand.eval_examples("val")
    assert [h.tolist() for h in histories] == [[1], [2, 1], [1, 2]]
    assert targets.tolist() == [2, 3, 3]
    histories, targets = hand.eval_examples("test")
    assert [h.tolist() for h in histories] == [[1, 2], [2, 1, 3], [1, 2, 3]]
    assert targets.tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="train"):
        hand.eval_examples("train")


def test_hand_example_popularity(hand):
    assert hand.item_counts.tolist() == [0, 3, 3, 3, 1, 1]
    assert hand.train_popularity.tolist() == [0, 3, 2, 0, 0, 0]  # u3 [1], u1 [2,1], u2 [1,2]
    # int(0.2 * 5) = 1 head item; items 1, 2, 3 tie at 3: the lowest id is head
    assert hand.tail_mask.tolist() == [False, False, True, True, True, True]
    assert hand.popularity_group.tolist() == [-1, 0, 0, 0, 0, 0]
    stats = hand.stats()
    assert {k: stats[k] for k in ("users", "evaluated_users", "items", "interactions",
                                  "head_items", "tail_items", "share_items_lt5")} == {
        "users": 3, "evaluated_users": 3, "items": 5, "interactions": 11,
        "head_items": 1, "tail_items": 4, "share_items_lt5": 1.0}
    assert stats["avg_length"] == pytest.approx(11 / 3)
    assert stats["sparsity"] == pytest.approx(1 - 11 / 15)


def test_validation_popularity_never_counts_a_test_item():
    data = leaky_test_items()
    # whole sequences (test metrics, the paper's split): 1:4 2:3 3:5 4:1 5:1 -> head {3}
    assert data.item_counts.tolist() == [0, 4, 3, 5, 1, 1]
    assert data.eval_tail_mask("test").tolist() == [False, True, True, False, True, True]
    assert data.eval_tail_mask("test") is data.tail_mask
    # seq[:-1] (validation metrics): 1:4 2:3 3:0 4:1 5:1 -> head {1}
    assert data.val_item_counts.tolist() == [0, 4, 3, 0, 1, 1]
    assert data.eval_tail_mask("val").tolist() == [False, False, True, True, True, True]
    # item 3: "5-9" with its test interactions, "1-4" (never counted) without
    assert data.eval_popularity_group("test").tolist() == [-1, 0, 0, 1, 0, 0]
    assert data.eval_popularity_group("val").tolist() == [-1, 0, 0, 0, 0, 0]
    # u3 (2 items) is not evaluated; validation targets of u0 u1 u2 u4: items 2 1 1 2, all
    # tail under the whole-sequence split, but items 1 are head under the validation one
    assert data.eval_users.tolist() == [0, 1, 2, 4]
    targets = data.eval_examples("val")[1]
    assert targets.tolist() == [2, 1, 1, 2]
    assert data.tail_mask[targets].all()
    assert data.eval_tail_mask("val")[targets].tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="train"):
        data.eval_tail_mask("train")


def test_popularity_group_boundaries():
    # item i appears counts[i] times (item 9 never): one user per interaction
    counts = [0, 4, 5, 9, 10, 19, 20, 49, 50, 0, 50]
    sequences = [np.array([item]) for item, c in enumerate(counts) for _ in range(c)]
    data = SequenceData("groups", 10, sequences, np.arange(len(sequences)).astype(str),
                        np.arange(1, 11).astype(str), None, None)
    assert data.item_counts.tolist() == counts
    assert POPULARITY_GROUPS == ("1-4", "5-9", "10-19", "20-49", "50+")
    assert data.popularity_group.tolist() == [-1, 0, 1, 1, 2, 2, 3, 3, 4, 0, 4]
    # int(0.2 * 10) = 2 head items: the two with 50
    assert np.flatnonzero(~data.tail_mask[1:]).tolist() == [7, 9]
    assert not data.tail_mask[0]
    assert data.stats()["share_items_lt5"] == pytest.approx(2 / 10)  # items 1 and 9
    assert data.train_popularity.sum() == 0  # one-item users have no training part
    assert data.train_sequences() == [] and data.stats()["evaluated_users"] == 0


def test_pad_left_keeps_the_last_items():
    seqs = [np.array([1, 2, 3]), np.array([4]), np.arange(5, 11), np.array([], np.int64)]
    assert pad_left(seqs, 4).tolist() == [[0, 1, 2, 3], [0, 0, 0, 4], [7, 8, 9, 10],
                                          [0, 0, 0, 0]]
    assert pad_left(seqs, 4).dtype == np.int64


def test_short_users_are_kept_but_not_evaluated(tmp_path, load):
    data = load({"format": "faerec", "interactions": write(tmp_path / "d.txt",
                                                           "1 1 2 3 4\n2 2\n3 3 1\n4 4 3 2\n")})
    assert data.stats()["users"] == 4 and data.stats()["evaluated_users"] == 2
    assert data.eval_examples("test")[1].tolist() == [4, 2]
    assert data.item_counts.tolist() == [0, 2, 3, 3, 2]  # the short users still count
    longer = load({"format": "faerec", "interactions": str(tmp_path / "d.txt"),
                   "min_sequence_length": 4})
    assert longer.stats()["evaluated_users"] == 1


# ---------------------------------------------------------------- formats

def test_faerec_keeps_paper_ids_and_validates_embeddings(tmp_path, load):
    txt = write(tmp_path / "Toy.txt", "10 3 1 2\n11 2 4\n")
    np.save(tmp_path / "emb.npy", np.arange(8, dtype=np.float32).reshape(4, 2))
    data = load({"format": "faerec", "interactions": txt, "embeddings": str(tmp_path / "emb.npy")})
    assert as_lists(data) == [[3, 1, 2], [2, 4]]  # ids as in the file, not renumbered
    assert data.user_ids.tolist() == ["10", "11"] and data.item_ids.tolist() == ["1", "2", "3", "4"]
    assert data.name == "Toy" and data.n_items == 4 and data.item_texts is None
    assert data.embeddings_path == str(tmp_path / "emb.npy")

    for name, array, message in [
            ("rows.npy", np.zeros((3, 2), np.float32), r"dataset.embeddings: expected 4 rows .*got 3"),
            ("flat.npy", np.zeros(4, np.float32), r"expected a 2-D array .*got shape \(4,\)"),
            ("nan.npy", np.array([[0, 0], [0, 0], [np.nan, 0], [0, 0]]),
             r"row 2 \(item 3\) has a NaN"),
            ("objects.npy", np.array([[{}], [{}], [{}], [{}]], dtype=object), "not .*plain .npy"),
    ]:
        np.save(tmp_path / name, array, allow_pickle=True)
        with pytest.raises(DataError, match=message) as e:
            load({"format": "faerec", "interactions": txt, "embeddings": str(tmp_path / name)})
        assert name in str(e.value)


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    """ml-100k from an empty cache: downloads the RecBole wheel from the package index."""
    cache = tmp_path_factory.mktemp("ml100k-cache")
    cfg = dataclasses.replace(resolve_dataset("ml-100k"), cache_dir=str(cache))
    return cfg, load_dataset(cfg)


def test_ml100k_from_an_empty_cache(ml100k):
    cfg, data = ml100k
    wheel = Path(cfg.cache_dir) / "downloads" / "recbole-1.2.1-py3-none-any.whl"
    assert wheel.is_file()
    stats = data.stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100_000)
    # independent reading of the same file: user 196's ratings by time, file order on ties
    with zipfile.ZipFile(wheel) as z:
        inter = pd.read_csv(io.BytesIO(z.read(ML100K_MEMBER + ".inter")), sep="\t", dtype=str)
        movies = pd.read_csv(io.BytesIO(z.read(ML100K_MEMBER + ".item")), sep="\t", dtype=str)
    inter["t"] = inter["timestamp:float"].astype(float)
    expected = inter[inter["user_id:token"] == "196"].sort_values("t", kind="stable")
    ours = data.sequences[data.user_ids.tolist().index("196")]
    assert data.item_ids[ours - 1].tolist() == expected["item_id:token"].tolist()
    first = movies[movies["item_id:token"] == data.item_ids[0]].iloc[0]
    assert data.item_texts[0] == (
        f"The movie has following attributes: title is {first['movie_title:token_seq']}; "
        f"release year is {first['release_year:token']}; "
        f"genres are {', '.join(first['class:token_seq'].split())}.")


def test_ml100k_cache_hit_reuses_the_entry(ml100k):
    """A hit reads the entry back without rebuilding it (a rebuild would write a new file);
    how fast that is belongs to a benchmark, not to a test on a shared machine."""
    cfg, data = ml100k
    (entry,) = (Path(cfg.cache_dir) / "datasets").glob("*.npz")
    before = entry.stat()
    again = load_dataset(cfg)
    after = entry.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert as_lists(again) == as_lists(data) and again.item_texts == data.item_texts


# Amazon reviews: U3 (1 review) is dropped; I3 keeps U1's review although U3's goes
# (one pass, counts before filtering); U4 keeps 1 item after I4 (1 review) is dropped.
REVIEWS = [("U1", "I1", 1), ("U1", "I2", 2), ("U1", "I3", 3), ("U2", "I1", 4), ("U2", "I2", 5),
           ("U3", "I3", 6), ("U4", "I4", 7), ("U4", "I1", 8)]
BEAUTY = ("The beauty item has following attributes: name is {title}; brand is {brand}; price "
          "is {price}. The item has following features: {categories}. The item has following "
          "descriptions: {description}.")


def test_amazon_2014_gzipped_python_literals_one_pass_filter(tmp_path, load):
    reviews = "".join(f"{{'reviewerID': '{u}', 'asin': '{i}', 'unixReviewTime': {t}, "
                      f"'reviewTime': '01 1, 2014'}}\n" for u, i, t in REVIEWS)
    meta = ("{'asin': 'I1', 'title': \"L'Oreal Cream\", 'price': 12.5, 'brand': 'Loreal', "
            "'categories': [['Beauty', 'Skin Care'], ['Beauty', 'Makeup']], "
            "'description': 'Smooth'}\n"
            "{'asin': 'I2', 'categories': [['Beauty']], 'salesRank': {'Beauty': 3}}\n"
            "{'asin': 'I4', 'title': 'filtered out'}\n")
    data = load({"format": "amazon",
                 "interactions": write_gz(tmp_path / "reviews_Beauty.json.gz", reviews),
                 "items": write_gz(tmp_path / "meta_Beauty.json.gz", meta),
                 "min_user_interactions": 2, "min_item_interactions": 2,
                 "prompt_template": BEAUTY})
    assert data.item_ids.tolist() == ["I1", "I2", "I3"]
    assert data.user_ids.tolist() == ["U1", "U2", "U4"]
    assert as_lists(data) == [[1, 2, 3], [1, 2], [1]]
    assert data.name == "reviews_Beauty"
    assert data.item_texts == [
        "The beauty item has following attributes: name is L'Oreal Cream; brand is Loreal; "
        "price is 12.5. The item has following features: Beauty, Skin Care, Makeup. "
        "The item has following descriptions: Smooth.",
        "The beauty item has following attributes: name is unknown; brand is unknown; price "
        "is unknown. The item has following features: Beauty. The item has following "
        "descriptions: unknown.",
        BEAUTY.format_map(dict.fromkeys(["title", "brand", "price", "categories",
                                         "description"], "unknown"))]


@pytest.mark.parametrize("release", ["2018", "2023"])
def test_amazon_2018_and_2023_json_lines(tmp_path, load, release):
    if release == "2018":
        reviews = [{"reviewerID": "A", "asin": "P1", "unixReviewTime": 20, "overall": 5.0},
                   {"reviewerID": "A", "asin": "P2", "unixReviewTime": 10}]
        meta = [{"asin": "P1", "title": "Pen", "brand": "Bic", "price": "$3.99",
                 "category": ["Office", "Pens"], "description": ["Blue", "ink."]},
                {"asin": "P1", "title": "a repeated record: the first one wins"}]
        text = ("The item has following attributes: name is Pen; brand is Bic; price is $3.99. "
                "The item has following features: Office, Pens. The item has following "
                "descriptions: Blue ink..")
    else:
        reviews = [{"user_id": "A", "asin": "C1", "parent_asin": "P1", "timestamp": 1600000000001},
                   {"user_id": "A", "asin": "C2", "parent_asin": "P2", "timestamp": 1600000000000}]
        meta = [{"parent_asin": "P1", "title": "Pen", "store": "Bic", "price": None,
                 "categories": [], "description": []}]
        text = ("The item has following attributes: name is Pen; brand is Bic; price is unknown. "
                "The item has following features: unknown. The item has following descriptions: "
                "unknown.")
    data = load({"format": "amazon", "interactions": write(tmp_path / "r.jsonl", jsonl(reviews)),
                 "items": write(tmp_path / "m.jsonl", jsonl(meta)),
                 "min_user_interactions": 0, "min_item_interactions": 0})
    assert data.item_ids.tolist() == ["P2", "P1"] and as_lists(data) == [[1, 2]]
    assert data.item_texts[1] == text


def test_amazon_defaults_to_the_papers_five_core(tmp_path):
    cfg = dataset_config_from_dict({"format": "amazon", "interactions": "r.json.gz"}, "x.yaml",
                                   base_dir=tmp_path)
    assert (cfg.min_user_interactions, cfg.min_item_interactions) == (5, 5)
    assert cfg.interactions == str(tmp_path / "r.json.gz") and cfg.name == "r"


def test_yelp_date_window_and_poi_prompt(tmp_path, load):
    reviews = [{"review_id": f"r{n}", "user_id": "U", "business_id": business, "date": date}
               for n, (business, date) in enumerate([("B1", "1999-12-31 23:59:59"),
                                                     ("B2", "2019-12-31 23:00:00"),
                                                     ("B1", "2000-01-01 00:00:00"),
                                                     ("B3", "2020-01-01 00:00:00"),
                                                     ("B3", "2010-06-01 12:00:00")])]
    business = [{"business_id": "B1", "name": "Joe's", "city": "Las Vegas", "state": "NV",
                 "stars": 4.5, "review_count": 10, "is_open": 1,
                 "categories": "Pizza, Restaurants", "attributes": {"WiFi": "free"}}]
    settings = {"format": "yelp", "interactions": write(tmp_path / "review.json", jsonl(reviews)),
                "items": write(tmp_path / "business.json", jsonl(business)),
                "min_user_interactions": 0, "min_item_interactions": 0}
    data = load(settings)
    assert data.item_ids.tolist() == ["B1", "B3", "B2"] and as_lists(data) == [[1, 2, 3]]
    assert data.item_texts[0] == (
        "The point of interest has following attributes: name is Joe's; category is Pizza, "
        "Restaurants; type is business; open status is 1; review count is 10; city is Las "
        "Vegas; average score is 4.5.")
    assert data.item_texts[1].startswith("The point of interest has following attributes: "
                                         "name is unknown; category is unknown; type is unknown;")
    narrow = load({**settings, "date_start": "2005-01-01", "date_end": "2019-12-31"})
    assert narrow.item_ids.tolist() == ["B3", "B2"]
    cfg = dataset_config_from_dict({"format": "yelp", "interactions": "r.json"}, "x.yaml")
    assert (cfg.date_start, cfg.date_end) == ("2000-01-01", "2019-12-31")
    assert cfg.min_user_interactions == cfg.min_item_interactions == 5


def test_csv_dates_items_table_and_text_columns(tmp_path, load):
    interactions = write(tmp_path / "inter.tsv", "who\twhat\twhen\n"
                         "1\t007\t2021-03-02\n1\t7\t2021-03-01 10:00\n2\t007\t2020-01-01\n")
    items = write(tmp_path / "items.csv", "sku,title,price,extra\n007,Spy Pen,9.5,x\n7,Mug,,y\n")
    settings = {"format": "csv", "interactions": interactions, "user_column": "who",
                "item_column": "what", "time_column": "when", "items": items,
                "item_id_column": "sku"}
    data = load({**settings, "prompt_template": "{title} costs {price}"})
    assert data.user_ids.tolist() == ["2", "1"] and data.item_ids.tolist() == ["007", "7"]
    assert as_lists(data) == [[1], [2, 1]]  # "007" and "7" stay different items
    assert data.item_texts == ["Spy Pen costs 9.5", "Mug costs unknown"]
    assert load({**settings, "text_columns": ["title", "price"]}).item_texts == [
        "title: Spy Pen; price: 9.5", "title: Mug; price: unknown"]
    assert load(settings).item_texts[0] == "title: Spy Pen; price: 9.5; extra: x"


def test_csv_parquet_separator_and_file_order(tmp_path, load):
    frame = pd.DataFrame({"user_id": [5, 5, 6], "item_id": [30, 10, 10], "ts": [2.5, 1.5, 0.5]})
    frame.to_parquet(tmp_path / "i.parquet")
    data = load({"format": "csv", "interactions": str(tmp_path / "i.parquet"), "time_column": "ts"})
    assert data.item_ids.tolist() == ["10", "30"] and as_lists(data) == [[1], [1, 2]]
    semicolons = write(tmp_path / "i.txt", "user_id;item_id\na;x\na;y\nb;y\n")
    data = load({"format": "csv", "interactions": semicolons, "separator": ";",
                 "time_column": None})
    assert as_lists(data) == [[1, 2], [2]]  # no time column: file order


# ---------------------------------------------------------------- real data (Table 1)

@pytest.mark.skipif(not (SHARED_DATA / "faerec_official" / "Beauty.txt").is_file(),
                    reason="shared data absent")
def test_beauty_table1_figures(tmp_path):
    cfg = dataclasses.replace(resolve_dataset("beauty"), cache_dir=str(tmp_path))
    stats = load_dataset(cfg).stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (52_204, 57_289, 394_908)
    assert round(stats["avg_length"], 2) == 7.56 and round(stats["sparsity"], 4) == 0.9999


@pytest.mark.skipif(not (SHARED_DATA / "amazon_office" / "items.tsv").is_file(),
                    reason="shared data absent")
def test_amazon_office_csv(tmp_path):
    cfg = dataclasses.replace(resolve_dataset(str(REPO_ROOT / "search_spaces" / "datasets" /
                                                  "amazon_office.yaml")), cache_dir=str(tmp_path))
    data = load_dataset(cfg)
    stats = data.stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (4_905, 2_420, 53_258)
    items = pd.read_csv(SHARED_DATA / "amazon_office" / "items.tsv", sep="\t", dtype=str)
    text = dict(zip(items["item_id"], items["text"]))
    assert data.item_texts == [text[i] for i in data.item_ids]


# ---------------------------------------------------------------- cache

def test_cache_hit_invalidation_on_file_and_setting_change(tmp_path, load):
    path = tmp_path / "i.csv"
    write(path, "user_id,item_id,timestamp\na,x,1\na,y,2\na,z,3\n")
    first = load({"format": "csv", "interactions": str(path)})
    entries = lambda: sorted((tmp_path / "cache" / "datasets").glob("*.npz"))  # noqa: E731
    [entry] = entries()
    stamp = (entry.stat().st_ino, entry.stat().st_mtime_ns)
    assert as_lists(load({"format": "csv", "interactions": str(path)})) == as_lists(first)
    assert [(e.stat().st_ino, e.stat().st_mtime_ns) for e in entries()] == [stamp]

    write(path, "user_id,item_id,timestamp\na,x,1\na,y,2\na,z,3\na,x,4\n")
    assert as_lists(load({"format": "csv", "interactions": str(path)})) == [[1, 2, 3, 1]]
    assert len(entries()) == 2
    assert load({"format": "csv", "interactions": str(path),
                 "min_sequence_length": 5}).stats()["evaluated_users"] == 0
    assert len(entries()) == 3
    assert not list((tmp_path / "cache" / "datasets").glob("*.tmp"))


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("settings, message", [
    ({"fromat": "csv"}, r"test.yaml: dataset: unknown dataset setting 'fromat' \(did you mean "
                        r"'format'\?\); allowed: format, name"),
    ({"format": "parquet"}, r"dataset.format: must be one of ml-100k, faerec.*got 'parquet'"),
    ({"min_user_interactions": "5"}, r"dataset.min_user_interactions: expected an integer, got '5'"),
    ({"min_item_interactions": True}, r"dataset.min_item_interactions: expected an integer, got True"),
    ({"format": "csv", "interactions": 3}, r"dataset.interactions: expected a string or null, got 3"),
    ({"format": "csv", "interactions": "a.csv", "text_columns": "title"},
     r"dataset.text_columns: expected a list of strings, got 'title'"),
    ({"format": "faerec"}, r"dataset.interactions: format 'faerec' needs a file path"),
    ({"format": "csv", "interactions": "a.csv", "date_start": "2001-01-01"},
     r"dataset.date_start: is not used by format 'csv' .*got '2001-01-01'"),
    ({"format": "faerec", "interactions": "a.txt", "min_item_interactions": 5},
     r"dataset.min_item_interactions: is not used by format 'faerec' .*got 5"),
    ({"min_sequence_length": 2}, r"dataset.min_sequence_length: must be >= 3, got 2"),
    ({"format": "yelp", "interactions": "r.json", "date_end": "20191231"},
     r"dataset.date_end: is not a YYYY-MM-DD date, got '20191231'"),
    ({"format": "amazon", "interactions": "r.json", "prompt_template": "name is {name}"},
     r"dataset.prompt_template: uses \{name\}; format 'amazon' has: brand, categories"),
    ({"prompt_template": "{title!r}"}, r"dataset.prompt_template: \(or text_columns\): .*plain column"),
    ({"format": "csv", "interactions": "a.csv", "prompt_template": "{title}"},
     r"need dataset.items"),
    ({"min_item_interactions": float("inf")}, r"dataset.min_item_interactions: expected an integer, got inf"),
])
def test_bad_settings_name_source_field_and_value(settings, message):
    with pytest.raises(ConfigError, match=message) as e:
        dataset_config_from_dict(settings, "test.yaml")
    assert "test.yaml" in str(e.value)


def test_bad_files_name_file_field_and_value(tmp_path, load):
    csv = write(tmp_path / "i.csv", "user_id,item_id,timestamp\na,x,1\na,y,2\nb,x,yesterday\n")
    cases = [
        ({"format": "csv", "interactions": str(tmp_path / "missing.csv")},
         DataError, "dataset.interactions: file not found: .*missing.csv"),
        ({"format": "csv", "interactions": csv, "user_column": "uid"},
         DataError, r"i.csv: no column 'uid' \(dataset.user_column\); "
                    r"columns: \['user_id', 'item_id', 'timestamp'\]"),
        ({"format": "csv", "interactions": csv},
         DataError, r"i.csv, data row 3: time 'yesterday' \(column 'timestamp'\) is not a number"),
        ({"format": "csv", "interactions": csv, "time_column": None, "min_item_interactions": 5},
         DataError, r"i.csv: no interaction left after the filters \(min_user_interactions=0, "
                    r"min_item_interactions=5"),
        ({"format": "csv", "interactions": csv, "time_column": None,
          "items": write(tmp_path / "items.csv", "item_id,title\nx,X\ny,Y\nx,Z\n")},
         DataError, r"items.csv: item id 'x' \(column 'item_id'\) appears twice: "
                    r"data rows 1 and 3"),
        ({"format": "csv", "interactions": csv, "time_column": None,
          "items": str(tmp_path / "items.csv"), "prompt_template": "{title} by {brand}"},
         ConfigError, r"dataset.prompt_template uses 'brand', which is not a column of .*items.csv "
                      r"\(columns: \['item_id', 'title'\]\)"),
        ({"format": "csv", "interactions": write(tmp_path / "i.dat", "a b\n")},
         ConfigError, r"i.dat: dataset.interactions has extension '.dat'; set dataset.separator"),
        ({"format": "faerec", "interactions": write(tmp_path / "f.txt", "1 1 2\n2 3 x\n")},
         DataError, r"f.txt, line 2: expected `user item item ...` with integer items, "
                    r"got '2 3 x'"),
        ({"format": "faerec", "interactions": write(tmp_path / "z.txt", "1 0 2\n")},
         DataError, r"z.txt, line 1: needs at least one item and item ids >= 1"),
        ({"format": "amazon", "interactions": write_gz(
            tmp_path / "r.json.gz",
            '{"reviewerID": "a", "asin": "x", "unixReviewTime": 1}\n{oops\n')},
         DataError, r"r.json.gz, line 2: not a JSON \(or Python literal\) object: '\{oops'"),
        ({"format": "amazon", "interactions": write(
            tmp_path / "r.json", '{"reviewerID": "a", "unixReviewTime": 1}\n')},
         DataError, r"r.json, line 1: no field parent_asin or asin "
                    r"\(fields: \['reviewerID', 'unixReviewTime'\]\)"),
        ({"format": "yelp", "interactions": write(tmp_path / "y.json", jsonl(
            [{"user_id": "u", "business_id": "b", "date": "2010-01-01 10:00:00"},
             {"user_id": "u", "business_id": "b", "date": "01/02/2010"}]))},
         DataError, r"y.json, line 2: date '01/02/2010' is not YYYY-MM-DD HH:MM:SS"),
    ]
    for settings, error, message in cases:
        with pytest.raises(error, match=message):
            load(settings)


def test_resolve_dataset_yaml_section_relative_paths_and_errors(tmp_path, load):
    write(tmp_path / "d.txt", "1 1 2 3\n")
    (tmp_path / "spaces").mkdir()
    space = write(tmp_path / "spaces" / "space.yaml",
                  "metric: val/overall/ndcg_20\n"
                  "dataset:\n  format: faerec\n  interactions: ../d.txt\n")
    cfg = resolve_dataset(space)
    assert cfg.interactions == str(tmp_path / "spaces" / ".." / "d.txt") and cfg.name == "d"
    assert resolve_dataset(write(tmp_path / "named.yaml", "dataset: ml-100k\n")).format == "ml-100k"
    with pytest.raises(ConfigError, match=r"--dataset 'nope': no such YAML file, and not a "
                                          r"built-in dataset \(ml-100k, amazon_office, beauty"):
        resolve_dataset("nope")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: YAML syntax error"):
        resolve_dataset(write(tmp_path / "bad.yaml", "dataset: [\n"))
    with pytest.raises(ConfigError, match=r"top.yaml: dataset: unknown dataset setting 'metric'"):
        resolve_dataset(write(tmp_path / "top.yaml", "metric: x\nformat: csv\n"))


# ---------------------------------------------------------------- CLI

def test_describe_json_and_table(tmp_path, capsys):
    write(tmp_path / "i.csv", HAND_CSV)
    yaml_path = write(tmp_path / "hand.yaml", "format: csv\ninteractions: i.csv\n"
                      "user_column: user\nitem_column: item\ntime_column: time\n"
                      "cache_dir: cache\n")
    assert main(["describe", "--dataset", yaml_path, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    keys = ("users", "items", "interactions", "head_items", "tail_items")
    assert {k: stats[k] for k in keys} == {
        "users": 3, "items": 5, "interactions": 11, "head_items": 1, "tail_items": 4}
    assert stats["first_prompt"] is None and stats["name"] == "i"
    assert (tmp_path / "cache" / "datasets").is_dir()  # relative cache_dir: next to the YAML
    assert main(["describe", "--dataset", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err
    # the module entry point itself, as users call it
    out = subprocess.run([sys.executable, "-m", "model.data", "describe", "--dataset", yaml_path],
                         capture_output=True, text=True, cwd=REPO_ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}).stdout
    assert "interactions      11" in out and "tail_items        4" in out
