"""dlnc search --executor ray: the trials on a Ray instance give what the local executor gives.

Ray is an optional extra (`pip install 'dlnc[ray]'`); without it these tests are skipped. The
test starts a local Ray instance with two CPUs, as a small cluster would run the tasks.
"""
from __future__ import annotations

import pytest

import dsl
from runtime import search

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'dlnc[ray]'")

TEXT = """model ray_search
param lr = 0.01
param hidden = 16
param keep = 0.9
data { source "digits"; split train=0.7 dev=0.3; normalize }
input x: float[64]
output y: class[10]
layers { dense hidden relu; dropout keep_prob=keep; dense 10 softmax }
train { optimizer adam lr=lr; batch_size 64; epochs 3; seed 3 }
search random trials=4 rounds=2 metric=dev_loss {
  lr = log_uniform(1e-3, 1e-1)
  hidden = choice(8, 16)
  keep = uniform(0.6, 1.0)
}
"""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, runtime_env=search.ray_runtime_env(), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_executor_matches_the_local_executor(local_ray, tmp_path):
    program = dsl.load(TEXT, str(tmp_path / "m.dln"))
    local = search.run_search(program, threads=1)
    remote = search.run_search(program, executor="ray", workers=2, threads=1)
    assert len(remote.trials) == 8
    assert [t.values for t in remote.trials] == [t.values for t in local.trials]
    assert [t.metric for t in remote.trials] == [t.metric for t in local.trials]       # bit for bit, same seed
    assert [r.describe() for regions in remote.regions for r in regions] == \
        [r.describe() for regions in local.regions for r in regions]
    assert all(t.status == "ok" for t in remote.trials)
    assert any(t.reused for t in remote.trials)                 # each Ray worker keeps its compiled graphs
    assert remote.best.result is not None                        # the best weights come back for the export


def test_dlnc_search_executor_ray_writes_the_search(local_ray, tmp_path, dlnc):
    path = tmp_path / "m.dln"
    path.write_text(TEXT)
    result = dlnc("search", path, "-o", tmp_path / "s", "--executor", "ray", "--workers", "2")
    assert result.code == 0, result.err
    assert (tmp_path / "s" / "search.csv").is_file() and (tmp_path / "s" / "best" / "model.onnx").is_file()


def test_address_needs_the_ray_executor(tmp_path, dlnc):
    path = tmp_path / "m.dln"
    path.write_text(TEXT)
    result = dlnc("search", path, "--address", "ray://head:10001")
    assert result.code == 2 and "add --executor ray" in result.err
