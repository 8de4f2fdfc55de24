"""The Ray Tune trainable: one trial = one `model.train.fit` run, reported every epoch.

The prepared dataset and LLM embeddings arrive through Ray's object store
(`tune.with_parameters`), so each node fetches them once instead of every trial
re-reading and re-embedding them. Every epoch the trial reports its validation metrics,
loss parts, curriculum weight and epoch time; it checkpoints so a retried trial resumes
where it was; its reports carry the test metrics of its best validation state, which
Tune never optimises on (the search metric is a `best/val/...` key).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from model.train import EpochRecord, Inputs, fit, settings_from_dict
from tuning.space import trial_settings

STATE_FILE = "state.pt"
RANKS_FILE = "test_ranks.npz"  # per-user test ranks of the best state (confirmation runs)


def best_key(metric: str) -> str:
    """The name under which a trial reports the best-so-far value of a validation metric."""
    return f"best/{metric}"


def outcome(metrics: dict, max_epochs: int) -> str:
    """How a trial that raised nothing ended, from its last result: "completed" when it ended
    itself (budget reached, or the training loop's early stopping), else "early-stopped" (the
    scheduler, ASHA, stopped it)."""
    ended_itself = metrics.get("finished") == 1.0 or metrics.get("epoch", 0) >= max_epochs
    return "completed" if ended_itself else "early-stopped"


def _assigned_device() -> str:
    """What Ray gave this trial: the visible GPU ids, or 'cpu'."""
    gpus = ray.get_gpu_ids()
    if gpus and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def train_trial(config: dict, inputs: Inputs, checkpoint_every: int,
                cache_dir: str | None = None, save_ranks: bool = False) -> None:
    """Function trainable: `config` holds the trial's full flat settings (tuning.space).
    `save_ranks`: after training, one more report whose checkpoint holds RANKS_FILE, the
    test rank of every user at the best state (the paired tests of the confirmation read
    it; a checkpoint reaches the driver from any node, a file in the trial folder may not)."""
    # Ray logs one line per checkpoint at INFO; with a checkpoint per epoch that buries
    # the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    settings = {**trial_settings(config), "device": _assigned_device()}
    model_cfg, train_cfg = settings_from_dict(settings, f"trial {tune.get_context().get_trial_id()}")

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            # tensors and plain values only: a crafted checkpoint cannot run code
            resume = torch.load(Path(folder) / STATE_FILE, weights_only=True)

    last = {}

    def report(record: EpochRecord, snapshot) -> None:
        if not record.best_val:  # before the first validation (min_epochs): Tune refuses a
            return               # result without the search metric, so there is none to send
        metrics = {**record.metrics, "epoch": record.epoch, "best_epoch": record.best_epoch,
                   "finished": float(record.final),
                   "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                   "node_id": ray.get_runtime_context().get_node_id()}
        metrics.update({best_key(k): v for k, v in record.best_val.items()})
        metrics.update(record.best_test)
        last.update(metrics)
        if record.improved or record.final or record.epoch % checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(snapshot(), Path(folder) / STATE_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(metrics)

    result = fit(inputs, model_cfg, train_cfg, on_epoch=report, resume=resume,
                 test_on_improvement=True, cache_dir=cache_dir)
    ranks = getattr(result, "test_ranks", None)  # model.metrics.UserRanks (issue 8, model side)
    if save_ranks and ranks is not None and last:
        with tempfile.TemporaryDirectory() as folder:
            ranks.save(Path(folder) / RANKS_FILE)
            tune.report(last, checkpoint=tune.Checkpoint.from_directory(folder))
