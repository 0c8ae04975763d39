"""A real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: two raylets, 3 CPUs
each): `sora preprocess --address` writes the cache a one-node run writes, byte for byte, with
the VAE's work on both nodes; `sora train --address --num-workers 2` puts one worker on each
node and gives the losses of a one-node run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import assert_same_cache, run_sora

pytestmark = pytest.mark.slow

NODE_CPUS = 3
# Two VAE actors of 2 CPUs cannot share a node of 3: one per node. The same for the trainers.
SPREAD = ("vae=dict(concurrency=1,", "vae=dict(concurrency=2, num_cpus=2,")


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


def spread_config(config: Path, folder: Path) -> Path:
    text = config.read_text()
    assert SPREAD[0] in text, "the debug config's preprocess section sets the VAE stage"
    text = text.replace(*SPREAD) + "\nworker_cpus = 2\n"
    path = folder / "spread.py"
    path.write_text(text)
    return path


def sora(*args: str, address: str) -> str:
    result = run_sora(*args, "--address", address)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def test_preprocess_on_two_nodes_writes_the_one_node_cache(two_nodes, clean_cache, demo_csv, tmp_path):
    cache, config = clean_cache
    spread = spread_config(config, tmp_path)
    log = sora("preprocess", str(demo_csv), "--config", str(spread), "--cache-dir", str(tmp_path / "cache"),
               address=two_nodes)  # fmt: skip
    placed = re.search(r"VAE rows per node \((\d+) node\(s\)\): (.*)", log)
    assert placed and placed.group(1) == "2", log[-3000:]  # the VAE's work landed on both nodes
    assert_same_cache(tmp_path / "cache", cache)


def test_train_on_two_nodes_gives_the_one_node_losses(two_nodes, clean_cache, tmp_path):
    cache, config = clean_cache
    spread = spread_config(config, tmp_path)
    args = ["train", str(spread), "--data-path", str(cache), "--num-workers", "2", "--epochs", "2"]
    one = run_sora(*args, "--outputs", str(tmp_path / "one"))
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    sora(*args, "--outputs", str(tmp_path / "two"), address=two_nodes)

    def losses(outputs: Path) -> list[float]:
        lines = (outputs / "000-debug" / "losses.jsonl").read_text().splitlines()
        return [entry["loss"] for entry in map(json.loads, lines)]

    def nodes(outputs: Path) -> set[str]:
        return {json.loads(p.read_text())["node"] for p in (outputs / "000-debug").glob("worker-rank*.json")}

    assert len(nodes(tmp_path / "two")) == 2, "one worker on each node"
    assert len(nodes(tmp_path / "one")) == 1
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
