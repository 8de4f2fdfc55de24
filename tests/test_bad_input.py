"""Bad input, through the real command lines: one clear message naming the file, the field
and the value, exit status 2, and nothing created (no results folder, no MLflow store).

Every case runs the `main(argv)` of `run_search.py`, `python -m model.train` or
`python -m model.data` (argument parsing, validation, preflight, error printing) inside
ONE fresh interpreter that takes the cases in turn: each CLI start imports torch (about
5-10 s on the shared CPU), so a process per case would make this file take minutes.
"""

import io
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A valid space: each case breaks one thing in it.
SPACE = """\
name: probe
dataset: ml-100k
embedding:
  encoder: random
  dim: 8
fixed:
  hidden_size: 8
search:
  metric: val/overall/ndcg_20
  num_samples: 2
  max_epochs: 2
  resources:
    cpu: 1
    gpu: 0
params:
  lambda:
    type: loguniform
    low: 0.001
    high: 0.1
references: false
confirm: false
"""

# Runs the cases it reads on stdin, each through its CLI's main(argv), and writes one
# JSON result per case: exit status, what was printed, seconds to the message.
RUNNER = r"""
import contextlib, importlib, io, json, os, sys, time, traceback
results = []
for case in json.load(sys.stdin):
    saved = dict(os.environ)
    os.environ.update(case["env"])
    for name in case["unset"]:
        os.environ.pop(name, None)
    out, err = io.StringIO(), io.StringIO()
    tic = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = importlib.import_module(case["module"]).main(case["argv"])
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc = "traceback"
            traceback.print_exc()
    results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
                    "seconds": time.perf_counter() - tic})
    os.environ.clear()
    os.environ.update(saved)
print(json.dumps(results))
"""


@dataclass
class Case:
    id: str
    module: str                      # run_search | model.train | model.data
    argv: list[str]                  # {tmp} = the case's own folder, {space} = its space file
    expect: list[str]                # all in the message: file, field, value
    space: str | bytes | None = None  # the space file's text (run_search), SPACE if None
    files: dict[str, str | bytes] = field(default_factory=dict)  # more files in {tmp}
    env: dict[str, str] = field(default_factory=dict)
    unset: list[str] = field(default_factory=list)
    rc: int = 2
    secret: str | None = None        # must appear nowhere in what is printed
    warns: bool = False              # rc 0, and `expect` is a warning on stderr


def _replace(old: str, new: str) -> str:
    assert old in SPACE
    return SPACE.replace(old, new)


def search(*extra: str) -> list[str]:
    """run_search.py's arguments: the case's space, results and MLflow store in {tmp}."""
    return ["--space", "{space}", "--storage-path", "{tmp}/results",
            "--tracking-uri", "sqlite:///{tmp}/mlflow.db", *extra]


CASES = [
    Case("tracking-uri-scheme", "run_search", search("--tracking-uri", "ftp://x"),
         ["search.tracking_uri", "ftp://x", "ftp://"]),
    Case("tracking-uri-credentials-masked", "run_search",
         search("--tracking-uri", "postgresql+nosuchdriver://alice:s3cret-pw@db/mlflow"),
         ["search.tracking_uri", "postgresql+nosuchdriver://***@db/mlflow", "driver"],
         secret="s3cret-pw"),
    Case("storage-path-not-a-folder", "run_search", search("--storage-path", "{tmp}/a-file/results"),
         ["search.storage_path", "{tmp}/a-file/results", "is a file, not a folder"],
         files={"a-file": "not a folder"}),
    Case("address-refused", "run_search", search("--address", "127.0.0.1:{port}"),
         ["--address 127.0.0.1:{port}", "cannot connect"]),
    Case("address-not-a-ray-head", "run_search", search("--address", "127.0.0.1:{mute_port}"),
         ["--address 127.0.0.1:{mute_port}", "not a Ray head"]),
    Case("address-auto-no-cluster", "run_search", search("--address", "auto"),
         ["--address auto", "no running Ray cluster"],
         env={"RAY_TMPDIR": "{tmp}"}, unset=["RAY_ADDRESS"]),
    Case("resume-unknown-name", "run_search", search("--resume", "--name", "neverran"),
         ["--resume", "'neverran'", "{tmp}/results"]),
    Case("duplicate-yaml-key", "run_search", search(), ["{space}:11", "'num_samples'", "twice", "line 10"],
         space=_replace("  num_samples: 2\n", "  num_samples: 2\n  num_samples: 40\n")),
    Case("space-not-utf8", "run_search", search(), ["{space}:1", "not UTF-8", "\\xe9"],
         space=SPACE.replace("name: probe", "name: probe-caf\xe9").encode("latin-1")),
    Case("search-device-ignored", "run_search", search(), ["{space}", "fixed.device", "search.resources.gpu"],
         space=_replace("fixed:\n", "fixed:\n  device: cuda:7\n")),
    Case("gpus-this-machine-lacks", "run_search", search(),
         ["{space}", "search.resources.gpu = 64", "GPU"],
         space=_replace("    gpu: 0\n", "    gpu: 64\n")),
    Case("non-finite-fixed-setting", "run_search", search(), ["{space}", "fixed", "alpha", "inf"],
         space=_replace("fixed:\n", "fixed:\n  alpha: .inf\n")),
    Case("impossible-date-unquoted", "run_search", search(),
         ["{tmp}/yelp.yaml", "dataset.date_start", "'2020-13-01'", "YYYY-MM-DD"],
         space=_replace("dataset: ml-100k", "dataset: yelp.yaml"),
         files={"yelp.yaml": "format: yelp\ninteractions: r.json\ndate_start: 2020-13-01\n"}),
    # a dry run succeeds and prints the plan, the tracking server's password masked (the
    # plan reaches Slurm and `ray job` logs; the label is also an MLflow param)
    Case("plan-masks-credentials", "run_search",
         search("--dry-run", "--tracking-uri", "http://alice:s3cret-pw@127.0.0.1:5000"),
         ["MLflow:     http://***@127.0.0.1:5000", "tracking_uri='http://***@127.0.0.1:5000'"],
         rc=0, secret="s3cret-pw"),
    Case("train-set-inf", "model.train", ["--set", "lambda=.inf", "--epochs", "1"],
         ["command line", "lambda", "finite", "inf"]),
    Case("train-device-beyond-visible", "model.train", ["--set", "device=cuda:63"],
         ["device", "'cuda:63'", "GPU"]),
    Case("endpoint-key-over-http", "model.train",
         ["--embedding", "encoder=openai", "--embedding", "url=http://example.com/v1/embeddings",
          "--embedding", "model=m"], ["--embedding: url: http://example.com", "https"],
         env={"OPENAI_API_KEY": "sk-test-key-1234"}, secret="sk-test-key-1234"),
    Case("endpoint-key-variable-not-an-api-key", "model.train",
         ["--embedding", "encoder=openai", "--embedding", "url=https://example.com/v1",
          "--embedding", "model=m", "--embedding", "api_key_env=RAY_AUTH_TOKEN"],
         ["--embedding: api_key_env: 'RAY_AUTH_TOKEN'", "API_KEY"]),
]


def describe(name: str) -> list[str]:
    """`python -m model.data describe` of the dataset file {tmp}/NAME, as JSON."""
    return ["describe", "--dataset", "{tmp}/" + name, "--json"]


def csv_dataset(interactions: str, extra: str = "") -> dict[str, str]:
    """A csv dataset (columns user, item, time) and its section d.yaml, cache in {tmp}."""
    return {"i.csv": interactions, "d.yaml": "format: csv\ninteractions: i.csv\n"
            "user_column: user\nitem_column: item\ntime_column: time\ncache_dir: cache\n"
            + extra}


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


NESTED = '{"reviewerID": "a", "asin": ' + "[" * 100_000 + "]" * 100_000 + ', "unixReviewTime": 1}\n'
SHORT_USERS = "".join(f"{u} {u} {u + 1}\n" for u in range(1, 30))  # every user: 2 items
SHOP = "format: csv\nname: shop.{v}\ninteractions: {f}\ncache_dir: {{root}}/shared-cache\n" \
       "user_column: user\nitem_column: item\ntime_column: time\n"

CASES += [
    # the data layer, through `python -m model.data describe` and `python -m model.train`
    Case("dotted-name-1", "model.data", describe("shop.yaml"), ['"name": "shop.v1"', '"users": 2'],
         rc=0, files={"a.csv": "user,item,time\nu1,a,1\nu1,b,2\nu2,a,3\n",
                      "shop.yaml": SHOP.format(v="v1", f="a.csv")}),
    # same cache folder, another file and name that differ after the dot: its own entry
    Case("dotted-name-2", "model.data", describe("shop.yaml"), ['"name": "shop.v2"', '"users": 3'],
         rc=0, files={"b.csv": "user,item,time\nu1,a,1\nu2,b,2\nu3,c,3\nu3,a,4\n",
                      "shop.yaml": SHOP.format(v="v2", f="b.csv")}),
    Case("time-mixes-dates-and-numbers", "model.data", describe("d.yaml"),
         ["{tmp}/i.csv", "data row 2", "'1999'", "'time'", "mixes dates and numbers"],
         files=csv_dataset("user,item,time\nu1,a,2020-01-01\nu1,b,1999\nu2,a,2020-01-03\n")),
    Case("every-row-duplicated", "model.data", describe("d.yaml"),
         ["{tmp}/i.csv", "3 of 6", "repeat"], warns=True,
         files=csv_dataset("user,item,time\n" + "u1,a,1\nu1,a,1\nu1,b,2\nu1,b,2\nu2,a,3\nu2,a,3\n")),
    Case("items-table-lacks-most-ids", "model.data", describe("d.yaml"),
         ["{tmp}/items.csv", "2 of 3 items", "unknown"], warns=True,
         files={**csv_dataset("user,item,time\nu1,a,1\nu1,b,2\nu2,c,3\n", "items: items.csv\n"
                                            "item_id_column: item_id\n"),
                "items.csv": "item_id,title\na,Alpha\nz,Zulu\n"}),
    Case("sparsity-with-repeated-items", "model.data", describe("d.yaml"), ['"sparsity": 0.0'],
         rc=0, files=csv_dataset("user,item,time\nu1,a,1\nu1,a,2\nu1,a,3\nu1,a,4\n")),
    Case("faerec-not-utf8", "model.data", describe("d.yaml"), ["{tmp}/f.txt", "line 2", "UTF-8"],
         files={"f.txt": b"1 1 2 3\n2 2 \xff 3\n", "d.yaml": "format: faerec\ninteractions: f.txt\n"
                "cache_dir: cache\n"}),
    Case("impossible-date-start-quoted", "model.data", describe("d.yaml"),
         ["{tmp}/d.yaml", "dataset.date_start", "'2020-13-01'"],
         files={"d.yaml": "format: yelp\ninteractions: r.json\ndate_start: '2020-13-01'\n"}),
    Case("npy-of-strings", "model.data", describe("d.yaml"), ["{tmp}/e.npy", "dtype"],
         files={"f.txt": "1 1 2 3\n2 2 1 3\n", "e.npy": _npy(np.array([["a"], ["b"], ["c"]])),
                "d.yaml": "format: faerec\ninteractions: f.txt\nembeddings: e.npy\n"
                          "cache_dir: cache\n"}),
    Case("amazon-line-nested-too-deep", "model.data", describe("d.yaml"),
         ["{tmp}/r.json", "line 2", "JSON"],
         files={"r.json": '{"reviewerID": "a", "asin": "x", "unixReviewTime": 1}\n' + NESTED,
                "d.yaml": "format: amazon\ninteractions: r.json\ncache_dir: cache\n"}),
    Case("cache-dir-not-writable", "model.data", describe("d.yaml"),
         ["dataset.cache_dir", "{tmp}/a-file/cache", "not a writable folder"],
         files={**csv_dataset("user,item,time\nu1,a,1\nu1,b,2\n"), "a-file": "x",
                "d.yaml": "format: csv\ninteractions: i.csv\nuser_column: user\n"
                          "item_column: item\ntime_column: time\ncache_dir: a-file/cache\n"}),
    Case("every-user-shorter-than-3", "model.train",
         ["--dataset", "{tmp}/d.yaml", "--method", "base", "--epochs", "1"],
         ["{tmp}/f.txt", "min_sequence_length", "3"],
         files={"f.txt": SHORT_USERS, "d.yaml": "format: faerec\ninteractions: f.txt\n"
                "cache_dir: cache\n"}),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case, run once in one fresh interpreter; {case id: (result, its folder)}."""
    root = tmp_path_factory.mktemp("bad-input")

    def fill_root(text: str) -> bytes:
        return text.replace("{root}", str(root)).encode()
    # bound, never listening: connections are refused; listening, never answering: TCP
    # connects (the kernel's backlog) but no gRPC handshake ever comes
    with socket.socket() as held, socket.socket() as mute:
        held.bind(("127.0.0.1", 0))
        port = str(held.getsockname()[1])
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        mute_port = str(mute.getsockname()[1])
        batch, folders = [], {}
        for case in CASES:
            tmp = root / case.id
            tmp.mkdir()
            space = tmp / "space.yaml"
            text = SPACE if case.space is None else case.space
            space.write_bytes(text if isinstance(text, bytes) else text.encode())
            for name, content in case.files.items():
                (tmp / name).write_bytes(content if isinstance(content, bytes)
                                         else fill_root(content))

            def fill(s, tmp=tmp, space=space):
                return s.replace("{tmp}", str(tmp)).replace("{space}", str(space)).replace(
                    "{port}", port).replace("{mute_port}", mute_port).replace("{root}", str(root))
            batch.append({"module": case.module, "argv": [fill(a) for a in case.argv],
                          "env": {k: fill(v) for k, v in case.env.items()},
                          "unset": case.unset})
            folders[case.id] = (tmp, fill)
        done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(batch),
                              capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={**_env(), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    return {case.id: (answer, *folders[case.id]) for case, answer in zip(CASES, answers)}


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY",)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_message_and_creates_nothing(case, results):
    answer, tmp, fill = results[case.id]
    message = answer["stderr"] if case.rc or case.warns else answer["stdout"]
    print(f"{case.id}: {answer['seconds']:.2f} s: {message.strip()}")  # shown by pytest -rP
    assert answer["rc"] == (0 if case.warns else case.rc), answer["stderr"]
    if case.rc and not case.warns:
        assert message.startswith("error: ") and "Traceback" not in message, message
        assert len(message.strip().splitlines()) == 1, message  # one message, not a log
    for part in case.expect:
        assert fill(part) in message, f"{fill(part)!r} not in {message!r}"
    assert not (tmp / "results").exists() and not (tmp / "mlflow.db").exists()
    assert not case.secret or case.secret not in answer["stderr"] + answer["stdout"]
