"""Test environment: offline, CPU-only, few threads, fast deterministic defaults."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """A small phantom dataset (train/val/test splits), generated once per test session."""
    from lit_spine.phantom.generate import generate_phantom

    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, studies=12, seed=0, splits={"train": 8, "val": 2, "test": 2}, size=128)
    return root
