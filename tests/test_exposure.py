"""Nothing secret leaves where it belongs, nothing listens beyond this machine: the
embedding endpoint's key, credentials inside URLs, Ray's ports and token, checkpoints
that could carry code, the ML-100K download, the YAML loader's rules."""

import http.server
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model.config import (EmbeddingConfig, dataset_config_from_dict, embedding_config_from_dict,
                          settings_from_dict)
from model.datasets import RECBOLE_WHEEL, fetch_ml100k
from model.errors import ConfigError, DataError
from model.text import item_embeddings
from model.train import fit, load_inputs
from model.urls import endpoint_key, mask_text, mask_url
from model.yamlfile import load_yaml

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-0123456789abcdef"


# ---------------------------------------------------------------- URLs

@pytest.mark.parametrize("url, shown", [
    ("postgresql://alice:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("http://alice@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    ("https://h/v1/embeddings?api-key=pw&api-version=2024-02-01",
     "https://h/v1/embeddings?api-key=***&api-version=2024-02-01"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),  # unchanged, slashes kept
    ("https://api.openai.com/v1/embeddings", "https://api.openai.com/v1/embeddings"),
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def test_mask_text_masks_every_uri_in_a_yaml_file():
    text = 'tracking_uri: "postgresql://u:pw1@db/x"  # or http://v:pw2@h:5000\nname: a@b\n'
    assert mask_text(text) == 'tracking_uri: "postgresql://***@db/x"  # or http://***@h:5000\nname: a@b\n'


@pytest.mark.parametrize("url, env, allowed", [
    ("https://api.example.com/v1/embeddings", "OPENAI_API_KEY", True),
    ("http://127.0.0.1:8000/v1/embeddings", "OPENAI_API_KEY", True),
    ("http://localhost:8000/v1/embeddings", "LOCAL_API_KEY", True),
    ("http://[::1]:8000/v1/embeddings", "OPENAI_API_KEY", True),
    ("http://10.0.0.5:8000/v1/embeddings", "OPENAI_API_KEY", False),  # key in clear text
    ("https://api.example.com/v1/embeddings", "RAY_AUTH_TOKEN", False),
    ("https://api.example.com/v1/embeddings", "AWS_SECRET_ACCESS_KEY", False),
])
def test_endpoint_key_rules(url, env, allowed):
    environ = {env: KEY}
    if allowed:
        assert endpoint_key(url, env, environ) == KEY
    else:
        with pytest.raises(ConfigError) as e:
            endpoint_key(url, env, environ)
        assert env in str(e.value) and KEY not in str(e.value)
    # without a key in the environment plain http to another host is fine (a local server)
    if env.endswith("API_KEY"):
        assert endpoint_key(url, env, {}) is None


# ---------------------------------------------------------------- the endpoint, for real

class _Redirecting(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.seen.append(self.headers.get("Authorization"))
        self.send_response(307)
        self.send_header("Location", self.server.target)
        self.end_headers()

    def log_message(self, *args):
        pass


def _serve(target=""):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    server.seen, server.target = [], target
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1/embeddings"


def _texts(texts):
    return SimpleNamespace(name="tiny", n_items=len(texts), item_texts=texts, embeddings_path=None)


def test_a_redirect_is_refused_and_the_key_goes_nowhere_else(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_EMB_API_KEY", KEY)
    elsewhere, elsewhere_url = _serve()
    first, url = _serve(target=elsewhere_url)
    try:
        cfg = embedding_config_from_dict({"encoder": "openai", "url": url, "model": "m",
                                          "api_key_env": "TEST_EMB_API_KEY", "max_retries": 0,
                                          "cache_dir": str(tmp_path)}, "test")
        with pytest.raises(ConfigError) as e:
            item_embeddings(_texts(["a"]), cfg)
    finally:
        first.shutdown()
        elsewhere.shutdown()
    assert first.seen == [f"Bearer {KEY}"] and elsewhere.seen == []
    assert "HTTP 307" in str(e.value) and "redirect" in str(e.value)
    assert elsewhere_url in str(e.value) and KEY not in str(e.value)


def test_credentials_in_the_endpoint_url_stay_out_of_cache_and_messages(tmp_path):
    cfg = embedding_config_from_dict({"encoder": "openai", "max_retries": 0, "model": "m",
                                      "url": "http://alice:url-secret@127.0.0.1:9/v1/embeddings",
                                      "cache_dir": str(tmp_path)}, "test")
    with pytest.raises(ConfigError) as e:
        item_embeddings(_texts(["a"]), cfg)
    assert "url-secret" not in str(e.value) and "***@127.0.0.1:9" in str(e.value)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(b"url-secret" in p.read_bytes() for p in written)


# ---------------------------------------------------------------- Ray: ports and token

LISTENERS = r"""
import json, os, sys
import ray
from tuning.cluster import start_ray

start_ray(None)
ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])  # workers listen too

def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid):
                out += [int(entry)] + children(int(entry))
        except OSError:
            pass
    return out

inodes = set()
for pid in [os.getpid()] + children(os.getpid()):
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
listening = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            listening.append(fields[1])
token = os.path.expanduser("~/.ray/auth_token")
print(json.dumps({"listening": listening,
                  "token_mode": oct(os.stat(token).st_mode & 0o777) if os.path.exists(token) else None}))
ray.shutdown()
"""


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6}'s local address (host byte order, 32-bit words) as an address."""
    host = bytes.fromhex(hex_address.split(":")[0])
    host = b"".join(host[i:i + 4][::-1] for i in range(0, len(host), 4))
    return ipaddress.ip_address(host)


def test_a_local_search_ray_listens_on_loopback_only_and_its_token_is_private(tmp_path):
    """What run_search.py starts without --address: every server of Ray (GCS, raylet,
    object manager, agents, the driver's and the workers' gRPC) on 127.0.0.1; Ray's token
    file (generated in an empty HOME here) readable by its owner only."""
    done = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True,
                          cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
                               "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    addresses = [_address(a) for a in found["listening"]]
    assert len(addresses) >= 5, found  # GCS, raylet, object manager, driver, 2 workers...
    exposed = [a for a in addresses if not (a.is_loopback or (
        a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback))]
    assert exposed == [], found
    assert found["token_mode"] == "0o600"


# ---------------------------------------------------------------- checkpoints, download

def test_a_training_snapshot_loads_with_weights_only_and_resumes(tiny_dataset, tmp_path):
    """The trainable loads checkpoints with weights_only=True (a pickled checkpoint could
    run code): everything a snapshot holds must load that way, and resume."""
    interactions, _ = tiny_dataset
    data = dataset_config_from_dict({"format": "faerec", "interactions": str(interactions),
                                     "cache_dir": str(tmp_path)}, "test")
    inputs = load_inputs(data, EmbeddingConfig(), need_llm=False)
    settings = {"method": "base", "hidden_size": 8, "max_len": 10, "epochs": 2, "seed": 1}
    snapshots = []
    model_cfg, train_cfg = settings_from_dict({**settings, "epochs": 1}, "test")
    fit(inputs, model_cfg, train_cfg, on_epoch=lambda r, snap: snapshots.append(snap()),
        cache_dir=str(tmp_path))
    torch.save(snapshots[-1], tmp_path / "state.pt")
    resume = torch.load(tmp_path / "state.pt", weights_only=True)
    model_cfg, train_cfg = settings_from_dict(settings, "test")
    result = fit(inputs, model_cfg, train_cfg, resume=resume, cache_dir=str(tmp_path))
    assert result.epochs_run == 2 and [h["epoch"] for h in result.history] == [1, 2]


def test_ml100k_wheel_with_another_hash_is_refused(tmp_path):
    wheel = tmp_path / "downloads" / RECBOLE_WHEEL
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK\x03\x04 not the wheel PyPI serves")
    with pytest.raises(DataError, match=f"{wheel}: sha256 .* is not the pinned"):
        fetch_ml100k(tmp_path)


# ---------------------------------------------------------------- YAML

def test_yaml_duplicate_key_anywhere_names_file_line_and_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("params:\n  tau:\n    low: 0.1\n    high: 0.5\n    low: 0.2\n")
    with pytest.raises(ConfigError, match=f"{path}:5: key 'low' is given twice .*line 3"):
        load_yaml(path)


def test_yaml_dates_stay_text(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("date_start: 2020-01-01\ndate_end: 2020-13-01\nn: 1.5\nflag: true\n")
    assert load_yaml(path) == {"date_start": "2020-01-01", "date_end": "2020-13-01",
                               "n": 1.5, "flag": True}


def test_the_search_record_holding_the_tracking_uri_is_private(tmp_path):
    """tracking.json keeps the real tracking URI (`tracking sync` needs it): mode 0600."""
    from tuning.tracking import read_settings, write_settings

    uri = "postgresql://alice:pw@db/mlflow"
    write_settings(tmp_path, tracking_uri=uri)
    write_settings(tmp_path, outcome="running")  # replaced whole, still private
    assert (tmp_path / "tracking.json").stat().st_mode & 0o777 == 0o600
    assert read_settings(tmp_path) == {"tracking_uri": uri, "outcome": "running"}
