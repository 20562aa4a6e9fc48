"""dlnc search: draws on the right scale, grids, coarse to fine, seeds, graph reuse, failures, outputs."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

import dsl
from compiler.program import compile_program
from runtime import search
from runtime.cli import compile_with_data, load_data
from runtime.trainer import train

HEAD = """model tiny
param lr = 0.01
param keep = 0.8
param hidden = 16
param lam = 0.001
data { source "digits"; split train=0.7 dev=0.3; normalize }
input x: float[64]
output y: class[10]
layers { dense hidden relu; dropout keep_prob=keep; dense 10 softmax }
train { optimizer adam lr=lr; batch_size 64; epochs 3; regularize l2 lambda=lam; seed 4 }
"""


def program(search_block: str, head: str = HEAD, path: str = "tiny.dln") -> dsl.ast.Program:
    return dsl.load(head + search_block, path)


def bowl(values, lr_best: float = -2.5) -> float:
    """A synthetic objective: best at lr = 10^−2.5, keep = 0.7, hidden = 64."""
    return ((math.log10(values["lr"]) - lr_best) ** 2 + 4 * (values.get("keep", 0.7) - 0.7) ** 2
            + (values.get("hidden", 64) != 64) * 0.05)


# ---------------------------------------------------------------- draws
def test_log_uniform_draws_evenly_per_decade():
    regions = search.initial_regions(program("search random trials=1 { lr = log_uniform(1e-4, 1) }").search)
    draws = np.array([p["lr"] for p in search.draw(regions, 4000, np.random.default_rng(0))])
    assert draws.min() >= 1e-4 and draws.max() <= 1
    per_decade = np.histogram(np.log10(draws), bins=[-4, -3, -2, -1, 0])[0] / len(draws)
    assert np.allclose(per_decade, 0.25, atol=0.03), per_decade     # uniform would put 90% in the last decade


def test_uniform_int_uniform_and_choice_draws():
    block = "search random trials=1 { keep = uniform(0.5, 1.0); hidden = int_uniform(8, 12); lr = choice(0.1, 0.01) }"
    points = search.draw(search.initial_regions(program(block).search), 500, np.random.default_rng(1))
    keeps = [p["keep"] for p in points]
    assert 0.5 <= min(keeps) and max(keeps) <= 1.0 and np.std(keeps) > 0.1
    assert {p["hidden"] for p in points} == {8, 9, 10, 11, 12} and all(isinstance(p["hidden"], int) for p in points)
    assert {p["lr"] for p in points} == {0.1, 0.01}


def test_grid_takes_every_combination():
    p = program("search grid { lr = [0.1, 0.01, 0.001]; hidden = [8, 16] }")
    points = search.grid(search.initial_regions(p.search))
    assert len(points) == 6 and {(q["lr"], q["hidden"]) for q in points} == {(a, b) for a in (0.1, 0.01, 0.001)
                                                                             for b in (8, 16)}


# ---------------------------------------------------------------- coarse to fine
def test_rounds_shrink_the_ranges_toward_the_optimum():
    p = program("search random trials=16 rounds=4 metric=dev_loss "
                "{ lr = log_uniform(1e-5, 1); keep = uniform(0.3, 1.0); hidden = choice(16, 32, 64, 128) }")
    result = search.run_search(p, objective=bowl)
    assert len(result.trials) == 64 and len(result.regions) == 4
    widths = [{r.name: r.width() for r in regions} for regions in result.regions]
    for before, after in zip(widths, widths[1:]):
        assert after["lr"] < before["lr"] and after["keep"] < before["keep"]
        assert after["hidden"] <= before["hidden"]
    last = {r.name: r for r in result.regions[-1]}
    assert last["lr"].low <= 10 ** -2.5 <= last["lr"].high           # the optimum stays inside
    assert last["keep"].low <= 0.7 <= last["keep"].high
    assert 64 in last["hidden"].values
    assert widths[-1]["lr"] < 0.2 * widths[0]["lr"]                  # on the log scale: ln(high/low)
    best_per_round = [min(t.metric for t in result.trials if t.round == r) for r in range(1, 5)]
    assert best_per_round[-1] <= best_per_round[0] and result.best.metric < 0.01


def test_grid_rounds_refine_around_the_best_value():
    p = program("search grid rounds=2 metric=dev_loss { lr = [1e-4, 1e-3, 1e-2, 1e-1]; keep = [0.5, 0.7, 0.9] }")
    result = search.run_search(p, objective=lambda values: bowl(values, lr_best=-2.2))
    first, second = ({r.name: r for r in regions} for regions in result.regions)
    assert len(result.trials) == 24 and first["lr"].log
    # halfway (on the log scale for lr) to the best value's neighbours, as many points as before
    assert second["lr"].values == pytest.approx(tuple(10 ** e for e in (-2.5, -13 / 6, -11 / 6, -1.5)), rel=1e-4)
    assert second["keep"].values == pytest.approx((0.6, 0.7, 0.8))


def test_same_seed_same_trials_other_seed_other_trials():
    block = "search random trials=5 rounds=2 { lr = log_uniform(1e-4, 1e-1); keep = uniform(0.5, 1); hidden = choice(16, 64) }"
    one = search.run_search(program(block), objective=bowl)
    two = search.run_search(program(block), objective=bowl)
    other = search.run_search(program(block, HEAD.replace("seed 4", "seed 5")), objective=bowl)
    assert [t.values for t in one.trials] == [t.values for t in two.trials]
    assert [t.values for t in one.trials] != [t.values for t in other.trials]


# ---------------------------------------------------------------- params and errors
def test_unknown_param_and_wrong_type_are_errors_in_search(tmp_path, dlnc):
    path = tmp_path / "m.dln"
    path.write_text(HEAD + "search random trials=2 { lr = log_uniform(1e-3, 1e-1) }\n")
    result = dlnc("search", path, "-o", tmp_path / "s", "--set", "hiden=32")
    assert result.code == 2 and "unknown param 'hiden'" in result.err and "did you mean 'hidden'" in result.err
    result = dlnc("search", path, "-o", tmp_path / "s", "--set", "hidden=wide")
    assert result.code == 2 and "takes a number" in result.err
    result = dlnc("search", path, "-o", tmp_path / "s", "--set", "lr=0.1")
    assert result.code == 2 and "searched" in result.err
    path.write_text(HEAD + "search random trials=2 { lr = choice(fast, slow) }\n")
    result = dlnc("search", path, "-o", tmp_path / "s")
    assert result.code == 2 and "this param is a number" in result.err
    path.write_text(HEAD + "search random trials=2 { depth = uniform(1, 3) }\n")
    result = dlnc("search", path, "-o", tmp_path / "s")
    assert result.code == 2 and "unknown param 'depth'" in result.err
    path.write_text(HEAD)
    result = dlnc("search", path, "-o", tmp_path / "s")
    assert result.code == 2 and "no search block" in result.err
    assert not (tmp_path / "s").exists()


def test_run_set_overrides_still_work_and_are_checked(tmp_path, dlnc):
    path = tmp_path / "m.dln"
    path.write_text(HEAD)
    assert dlnc("run", path, "-o", tmp_path / "r", "--set", "hidden=8", "--set", "lr=0.02", "--quiet").code == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["params"]["hidden"] == 8 and config["graph_inputs"]["lr"] == pytest.approx(0.02)
    assert dlnc("run", path, "-o", tmp_path / "r2", "--set", "nope=1").code == 2


# ---------------------------------------------------------------- one compiled graph per architecture
@pytest.mark.parametrize("extra", ["", "clip_norm 2.0; lr_decay inverse rate=0.3", "optimizer momentum lr=lr beta=0.8"])
def test_hyper_values_agree_with_the_compiler(extra):
    text = HEAD.replace("seed 4 }", f"seed 4; {extra} }}") if extra else HEAD
    if "momentum" in extra:
        text = text.replace("optimizer adam lr=lr; ", "")
    p = dsl.load(text, "tiny.dln")
    spec_hyper = compile_program(p).spec.hyper
    mine = search.hyper_values(p)
    assert set(spec_hyper) <= set(mine)
    assert {k: mine[k] for k in spec_hyper} == pytest.approx(dict(spec_hyper))


def test_graph_inputs_share_one_graph_and_architecture_params_recompile():
    base = dsl.load(HEAD, "tiny.dln")
    key = search.architecture_key
    same = [dsl.load(HEAD, "tiny.dln", {"lr": "0.3", "keep": "0.5", "lam": "0.2"})]
    assert all(key(p) == key(base) for p in same)
    assert key(dsl.load(HEAD, "tiny.dln", {"hidden": "32"})) != key(base)
    assert key(dsl.load(HEAD.replace("epochs 3", "epochs 9").replace("batch_size 64", "batch_size 16"),
                        "tiny.dln")) == key(base)


def test_a_reused_graph_trains_exactly_like_a_fresh_compile():
    p = program("search random trials=4 { lr = log_uniform(1e-3, 1e-1); keep = uniform(0.6, 1.0) }")
    search._CACHE.graphs.clear()
    result = search.run_search(p, threads=1)
    assert [t.reused for t in result.trials] == [False, True, True, True]
    assert sum(t.compile_seconds > 0 for t in result.trials) == 1
    last = result.trials[-1]
    fresh_program = dsl.load(p.source, p.path, search.trial_overrides({}, last.values))
    splits = load_data(fresh_program)
    fresh = train(compile_with_data(fresh_program, splits), splits, threads=1)
    assert fresh.final["dev"].error == last.metric
    assert fresh.final["dev"].loss == pytest.approx(last.splits["dev"]["loss"], rel=1e-6)


def test_architecture_change_compiles_a_new_graph():
    p = program("search grid { hidden = [8, 12]; lr = [0.01, 0.02] }")
    search._CACHE.graphs.clear()
    result = search.run_search(p, threads=1)
    compiled = {t.values["hidden"] for t in result.trials if not t.reused}
    assert compiled == {8, 12} and sum(t.reused for t in result.trials) == 2


# ---------------------------------------------------------------- failures, outputs, workers
SGD_HEAD = HEAD.replace("optimizer adam lr=lr", "optimizer sgd lr=lr").replace("; normalize", "")


def test_failed_and_diverging_trials_are_recorded_and_the_search_goes_on(tmp_path, dlnc):
    path = tmp_path / "m.dln"
    path.write_text(SGD_HEAD + "search grid metric=dev_error { lr = [1e9, 0.01]; hidden = [0, 16] }\n")
    result = dlnc("search", path, "-o", tmp_path / "s", "--threads", "1")
    assert result.code == 0, result.err
    rows = list(csv.DictReader((tmp_path / "s" / "search.csv").open()))
    assert len(rows) == 4 and rows[0]["status"] == "ok" and rows[0]["lr"] == "0.01" and rows[0]["hidden"] == "16"
    failed = {(r["lr"], r["hidden"]): r["reason"] for r in rows if r["status"] == "failed"}
    assert "diverged" in failed[("1000000000.0", "16")]
    assert failed[("0.01", "0")] and failed[("1000000000.0", "0")]            # units must be positive
    assert "failed: trial" in result.out and (tmp_path / "s" / "best" / "model.onnx").is_file()


def test_search_writes_the_table_the_plot_and_the_best_run(tmp_path, dlnc):
    path = tmp_path / "m.dln"
    path.write_text(HEAD + "search random trials=3 rounds=2 metric=dev_loss "
                           "{ lr = log_uniform(1e-3, 1e-1); keep = uniform(0.6, 1.0) }\n")
    result = dlnc("search", path, "-o", tmp_path / "s", "--workers", "2", "--threads", "1")
    assert result.code == 0, result.err
    folder = tmp_path / "s"
    rows = list(csv.DictReader((folder / "search.csv").open()))
    metrics = [float(r["dev_loss"]) for r in rows]
    assert len(rows) == 6 and metrics == sorted(metrics) and [r["rank"] for r in rows] == list("123456")
    assert {r["round"] for r in rows} == {"1", "2"}
    assert (folder / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((folder / "search.json").read_text())
    assert summary["best"]["trial"] == int(rows[0]["trial"]) and len(summary["rounds"]) == 2
    for name in ("model.onnx", "train_step.onnx", "report.txt", "report.json", "curves.png", "metrics.jsonl",
                 "config.json"):
        assert (folder / "best" / name).is_file(), name
    best = json.loads((folder / "best" / "report.json").read_text())
    assert best["splits"]["dev"]["loss"] == pytest.approx(metrics[0], rel=1e-6)
    table = result.out[result.out.index("rank"):]
    assert table.index(f" {rows[0]['trial']} ") < table.index(f" {rows[-1]['trial']} ")
    assert "reuse saved" in result.out and "best: trial" in result.out
    assert dlnc("search", path, "-o", folder).code == 2                     # an existing search needs --force


def test_parallel_workers_give_the_serial_results(tmp_path):
    p = program("search random trials=4 { lr = log_uniform(1e-3, 1e-1); hidden = choice(8, 16) }",
                path=str(tmp_path / "m.dln"))
    serial = search.run_search(p, threads=1)
    parallel = search.run_search(p, threads=1, workers=2)
    assert [(t.values, t.metric) for t in serial.trials] == [(t.values, t.metric) for t in parallel.trials]


def test_ray_executor_without_ray_says_how_to_install_it(tmp_path, dlnc, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)                    # `import ray` fails as if not installed
    path = tmp_path / "m.dln"
    path.write_text(HEAD + "search random trials=2 { lr = log_uniform(1e-3, 1e-1) }\n")
    result = dlnc("search", path, "-o", tmp_path / "s", "--executor", "ray")
    assert result.code == 2 and "pip install 'dlnc[ray]'" in result.err


@pytest.mark.parametrize("name", ["digits_search", "digits_cnn_grid"])
def test_search_examples_run_on_short_schedules(name, tmp_path, dlnc):
    import re
    from conftest import EXAMPLES
    text = (EXAMPLES / "search" / f"{name}.dln").read_text()
    text = re.sub(r"\bepochs \d+", "epochs 1", text).replace("trials=12", "trials=3")
    text = text.replace("[0.003, 0.01, 0.03, 0.1, 0.3]", "[0.01, 0.1]")
    path = tmp_path / f"{name}.dln"
    path.write_text(text)
    result = dlnc("search", path, "-o", tmp_path / "s", "--threads", "1")
    assert result.code == 0, result.err
    assert "round 2:" in result.out and (tmp_path / "s" / "best" / "model.onnx").is_file()
