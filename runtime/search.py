"""`dlnc search`: hyperparameter search over a program's params, on one machine or a Ray cluster.

    search random trials=N rounds=R metric=dev_error { lr = log_uniform(1e-4, 1e-1); ... }
    search grid rounds=R metric=dev_loss { lr = [0.1, 0.01, 0.001]; hidden = [32, 64] }

Trials. Each round draws `trials` points (random) or takes the whole grid, and every trial
trains the program with those values as `--set` overrides (so an unknown param or a value of
the wrong kind is the same error as on the command line). Draws: `uniform(a, b)` uniformly,
`log_uniform(a, b)` uniformly on the log scale (log a to log b, then exp: as many draws between
1e-4 and 1e-3 as between 1e-2 and 1e-1), `int_uniform(a, b)` whole numbers a..b, `choice(...)`
one of the values. The draws of round r come from a generator seeded by (train seed, r), so the
same program and seed give the same trials, whatever the executor and the number of workers.

Coarse to fine. After round r the `KEEP` share of the successful trials with the best metric
(at least 2) set round r + 1's region: for a numeric param, the span of their values (on the
log scale for log_uniform), padded by a tenth of the old range, at most half the old range
(centred on the best trial when the span is wider), and inside the old range; for `choice`,
the values among them; for a numeric grid, as many points as before from halfway to the best
value's lower neighbour to halfway to its upper one (on the log scale for a grid of positive
numbers that spans a factor of 10 or more).

One compiled graph per architecture. A trial differs from another in graph inputs only when
their programs agree once the graph inputs (lr, β, β1, β2, ε, λ, keep_prob, decay, clip_norm)
and the settings that are not in the graph (epochs, batch size, early stopping) are blanked
(`architecture_key`). Such a trial reuses the compiled training graph and both ONNX Runtime
sessions, and only feeds its own values as the graph's scalar inputs; any other change
(units, layers, the data) compiles and opens sessions anew. Each process keeps its own cache.

Executors. `local` runs the trials in this process (`--workers 1`) or in N spawned processes
(concurrent.futures); `ray` sends them to a Ray cluster (`ray.init(address=...)`, or a local
one). A trial that fails (its values do not compile, or training diverges) is recorded with
its reason and the search goes on. Results: search.csv and search.json, search.png (the metric
against each param, a log axis for log-scaled ones), and the best trial's run folder `best/`,
written as `dlnc run` writes one.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

import dsl
from dsl import ast
from dsl.errors import DlnError

KEEP = 0.25              # the share of a round's best trials that sets the next round's region
PAD = 0.1                # the region is padded by this share of the old range
MAX_WIDTH = 0.5          # and is at most this share of the old range
Objective = Callable[[Mapping[str, Any]], float]


# ---------------------------------------------------------------- the search space
@dataclass(frozen=True)
class Region:
    """Where a param is drawn from in one round: [low, high] (numeric) or `values`."""

    name: str
    dist: str                       # uniform | log_uniform | int_uniform | choice | grid
    low: float = 0.0
    high: float = 0.0
    values: tuple = ()
    log: bool = False               # drawn and plotted on the log scale

    def describe(self) -> str:
        if self.dist in ("choice", "grid"):
            shown = ", ".join(_fmt(v) for v in self.values)
            return f"{self.name} ∈ {{{shown}}}" + (" (log)" if self.log and self.dist == "grid" else "")
        return f"{self.name} ∈ [{_fmt(self.low)}, {_fmt(self.high)}]" + (" (log)" if self.log else "")

    def width(self) -> float:
        """The region's size on its own scale (numeric), or its number of values."""
        if self.dist in ("choice", "grid"):
            if self.values and all(_is_number(v) for v in self.values) and len(self.values) > 1:
                return _scale(max(self.values), self.log) - _scale(min(self.values), self.log)
            return float(len(self.values) - 1)
        return _scale(self.high, self.log) - _scale(self.low, self.log)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _scale(v: float, log: bool) -> float:
    return math.log(v) if log else float(v)


def _unscale(v: float, log: bool) -> float:
    return math.exp(v) if log else float(v)


def _log_grid(values: Sequence) -> bool:
    """A grid of positive numbers spanning a factor of 10 or more is searched on the log scale."""
    return all(_is_number(v) and v > 0 for v in values) and len(values) > 1 and max(values) / min(values) >= 10


def initial_regions(search: ast.Search) -> tuple[Region, ...]:
    regions = []
    for dim in search.dims:
        if dim.dist in ("choice", "grid"):
            log = dim.dist == "grid" and _log_grid(dim.args)
            regions.append(Region(dim.name, dim.dist, values=tuple(dim.args), log=log))
        else:
            low, high = (float(a) for a in dim.args)
            regions.append(Region(dim.name, dim.dist, low, high, log=dim.dist == "log_uniform"))
    return tuple(regions)


def draw(regions: Sequence[Region], count: int, rng: np.random.Generator) -> list[dict]:
    """`count` random points, one value per region (the grid kind takes a random grid value)."""
    points = []
    for _ in range(count):
        point = {}
        for r in regions:
            if r.dist in ("choice", "grid"):
                point[r.name] = r.values[int(rng.integers(len(r.values)))]
            elif r.dist == "int_uniform":
                point[r.name] = int(rng.integers(int(r.low), int(r.high) + 1))
            else:
                point[r.name] = _unscale(rng.uniform(_scale(r.low, r.log), _scale(r.high, r.log)), r.log)
        points.append(point)
    return points


def grid(regions: Sequence[Region]) -> list[dict]:
    """Every combination, the first param varying slowest."""
    names = [r.name for r in regions]
    return [dict(zip(names, combo)) for combo in itertools.product(*(r.values for r in regions))]


def refine(regions: Sequence[Region], ranked: Sequence[Mapping[str, Any]]) -> tuple[Region, ...]:
    """The next round's regions around the best points (`ranked`: best first, successful only)."""
    if not ranked:
        return tuple(regions)
    keep = ranked[:max(2, math.ceil(KEEP * len(ranked)))]
    best = ranked[0]
    return tuple(_refine_one(r, [p[r.name] for p in keep], best[r.name]) for r in regions)


def _refine_one(r: Region, kept: list, best) -> Region:
    if r.dist == "choice" or (r.dist == "grid" and not all(_is_number(v) for v in r.values)):
        return replace(r, values=tuple(v for v in r.values if v in kept) or (best,))
    if r.dist == "grid":
        ordered = sorted(set(r.values))
        if len(ordered) < 2:
            return r
        i, centre = ordered.index(best), _scale(best, r.log)
        lo = (centre + _scale(ordered[i - 1], r.log)) / 2 if i > 0 else centre
        hi = (centre + _scale(ordered[i + 1], r.log)) / 2 if i + 1 < len(ordered) else centre
        points = np.linspace(lo, hi, len(r.values))
        integral = all(isinstance(v, int) for v in r.values)
        values = [_unscale(p, r.log) for p in points]      # the old grid's own spacing halves at least
        values = sorted(set(int(round(v)) for v in values)) if integral else [float(f"{v:.6g}") for v in values]
        return replace(r, values=tuple(values))
    low, high = _scale(r.low, r.log), _scale(r.high, r.log)
    old = high - low
    values = [_scale(v, r.log) for v in kept]
    lo, hi = min(values) - PAD * old, max(values) + PAD * old
    if hi - lo > MAX_WIDTH * old:                         # centre the narrower range on the best trial
        centre = _scale(best, r.log)
        lo, hi = centre - MAX_WIDTH * old / 2, centre + MAX_WIDTH * old / 2
    if lo < low:                                          # moved, not cut, to stay inside the old range
        lo, hi = low, min(high, hi + (low - lo))
    if hi > high:
        lo, hi = max(low, lo - (hi - high)), high
    new_low, new_high = _unscale(lo, r.log), _unscale(hi, r.log)
    if r.dist == "int_uniform":
        new_low, new_high = math.floor(new_low + 1e-9), math.ceil(new_high - 1e-9)
        new_low, new_high = max(int(r.low), new_low), min(int(r.high), max(new_high, new_low))
    return replace(r, low=new_low, high=new_high)


# ---------------------------------------------------------------- one trial
@dataclass(frozen=True)
class TrialJob:
    """What a worker needs to run one trial (picklable: the program travels as text)."""

    number: int
    round: int
    values: Mapping[str, Any]
    text: str
    path: str | None
    overrides: Mapping[str, str]            # the command line's --set, under the trial's values
    metric: str
    threads: int | None = None
    objective: Objective | None = None       # tests: a function of the values instead of training


@dataclass
class TrialResult:
    number: int
    round: int
    values: dict
    status: str                              # ok | failed
    metric: float | None = None
    reason: str = ""
    splits: dict = field(default_factory=dict)   # split -> {"loss", "error"}
    epochs: int = 0
    train_seconds: float = 0.0
    compile_seconds: float = 0.0             # 0 where the architecture's graph was reused
    session_seconds: float = 0.0
    reused: bool = False
    worker: str = ""
    result: Any = None                       # the TrainResult (weights and history), for the best trial's export

    def row(self) -> dict:
        """The JSON-able fields (not the trained weights)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "result"}


def trial_overrides(base: Mapping[str, str], values: Mapping[str, Any]) -> dict[str, str]:
    """The --set pairs of a trial: the command line's, then the trial's values (repr keeps floats exact)."""
    return dict(base) | {name: (repr(v) if isinstance(v, float) else str(v)) for name, v in values.items()}


def architecture_key(program: ast.Program) -> Any:
    """The program with every graph input and every setting outside the graph blanked: two
    programs with the same key have the same training graph and evaluation graph."""
    t = program.train
    opt = replace(t.optimizer, lr=0.0, beta=0.0, beta1=0.0, beta2=0.0, eps=0.0)
    train = replace(t, optimizer=opt, regularize=replace(t.regularize, lam=0.0) if t.regularize else None,
                    lr_decay=replace(t.lr_decay, rate=0.0, every=1, factor=0.0) if t.lr_decay else None,
                    clip_norm=None if t.clip_norm is None else 0.0, epochs=0, batch_size=0, early_stopping=None)
    layers = tuple(replace(layer, keep_prob=0.0) if isinstance(layer, ast.Dropout) else layer
                   for layer in program.layers)
    blank = replace(program, params=(), search=None, layers=layers, train=train)
    try:
        hash(blank)
        return blank, program.path
    except TypeError:
        return repr(blank), program.path


def hyper_values(program: ast.Program) -> dict[str, float]:
    """The values of the training graph's scalar inputs for `program` (compile_program's
    `spec.hyper` computes the same; tests/test_search.py checks that they agree)."""
    t, opt = program.train, program.train.optimizer
    values = {"lr": opt.lr, "epoch": 0.0, "beta": opt.beta, "beta1": opt.beta1, "beta2": opt.beta2, "eps": opt.eps}
    if t.regularize is not None:
        values["lambda"] = t.regularize.lam
    if t.lr_decay is not None:
        values |= {"decay_rate": t.lr_decay.rate, "decay_every": t.lr_decay.every, "decay_factor": t.lr_decay.factor}
    if t.clip_norm is not None:
        values["clip_norm"] = t.clip_norm
    values |= {f"{layer.name}.keep_prob": layer.keep_prob for layer in program.layers if isinstance(layer, ast.Dropout)}
    return {name: float(v) for name, v in values.items()}


def data_key(program: ast.Program) -> Any:
    return program.data, program.input, program.output, program.train.seed, program.path


@dataclass
class WorkerCache:
    """A process's compiled graphs and sessions per architecture (the `GRAPHS_KEPT` used last),
    and its data per data block."""

    graphs: dict = field(default_factory=dict)    # architecture key -> (Compiled, train session, eval session, threads)
    data: dict = field(default_factory=dict)      # data key -> Splits


GRAPHS_KEPT = 8


_CACHE = WorkerCache()


def _init_worker(shipped) -> None:
    """A spawned worker starts with the data the parent loaded (no second read of the files)."""
    if shipped is not None:
        key, splits = shipped
        _CACHE.data[key] = splits


def _splits_for(program: ast.Program):
    from .cli import load_data
    key = data_key(program)
    if key not in _CACHE.data:
        _CACHE.data[key] = load_data(program)
    return _CACHE.data[key]


def _graphs_for(program: ast.Program, splits, threads: int | None, result: TrialResult) -> tuple:
    """(Compiled for this trial, train session, eval session): reused when the architecture was seen."""
    from .cli import compile_with_data
    from .session import make_session, training_graph
    key = architecture_key(program)
    cached = _CACHE.graphs.pop(key, None)
    if cached is not None:
        _CACHE.graphs[key] = cached                     # now the most recently used
    if cached is not None and cached[3] == threads:
        compiled, train_session, eval_session, _ = cached
        hyper = hyper_values(program)
        if set(compiled.spec.hyper) <= set(hyper):
            result.reused = True
            spec = replace(compiled.spec, hyper={name: hyper[name] for name in compiled.spec.hyper})
            return replace(compiled, program=program, spec=spec), train_session, eval_session
    start = time.perf_counter()
    compiled = compile_with_data(program, splits)
    result.compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    train_session = make_session(training_graph(compiled).model.SerializeToString(), "cpu", threads)
    eval_session = make_session(compiled.evaluation.SerializeToString(), "cpu", threads)
    result.session_seconds = time.perf_counter() - start
    _CACHE.graphs[key] = (compiled, train_session, eval_session, threads)
    while len(_CACHE.graphs) > GRAPHS_KEPT:
        _CACHE.graphs.pop(next(iter(_CACHE.graphs)))
    return compiled, train_session, eval_session


def run_trial(job: TrialJob, shipped=None) -> TrialResult:
    """Train one trial (or evaluate the objective); never raises: a failure is a failed result."""
    from .trainer import NonFiniteError, train
    if shipped is not None:
        _init_worker(shipped)
    result = TrialResult(job.number, job.round, dict(job.values), "failed", worker=f"{os.uname().nodename}:{os.getpid()}")
    start = time.perf_counter()
    try:
        if job.objective is not None:
            dsl.load(job.text, job.path, trial_overrides(job.overrides, job.values))   # the values must fit
            metric = float(job.objective(dict(job.values)))
        else:
            program = dsl.load(job.text, job.path, trial_overrides(job.overrides, job.values))
            splits = _splits_for(program)
            compiled, train_session, eval_session = _graphs_for(program, splits, job.threads, result)
            start_training = time.perf_counter()
            trained = train(compiled, splits, threads=job.threads, sessions=(train_session, eval_session))
            result.train_seconds = time.perf_counter() - start_training
            result.splits = {name: {"loss": m.loss, "error": m.error} for name, m in trained.final.items()}
            result.epochs = len(trained.history)
            split, kind = job.metric.split("_", 1)
            metric = trained.final[split].loss if kind == "loss" else trained.final[split].error
            result.result = trained
        if not math.isfinite(metric):
            result.reason = f"diverged: {job.metric} is {metric}"
            return result
        result.metric, result.status = metric, "ok"
    except NonFiniteError as exc:
        result.reason = "diverged: " + exc.message.split(";")[0].removeprefix("training stopped: ")
    except DlnError as exc:
        result.reason = exc.message
    except Exception as exc:                   # a bug or a crash in one trial must not end the search
        result.reason = f"internal error: {type(exc).__name__}: {exc}"
        if os.environ.get("DLNC_DEBUG"):
            traceback.print_exc()
    finally:
        if not result.train_seconds:
            result.train_seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- executors
class LocalExecutor:
    """Trials in this process (workers=1) or in `workers` spawned processes."""

    def __init__(self, workers: int, shipped):
        self.workers, self.shipped = workers, shipped
        self.pool = None
        if workers > 1:
            import multiprocessing
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(shipped,))

    def map(self, jobs: Sequence[TrialJob]) -> Iterable[TrialResult]:
        if self.pool is None:
            _init_worker(self.shipped)
            for job in jobs:
                yield run_trial(job)
            return
        futures = [self.pool.submit(run_trial, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class RayExecutor:
    """Trials as Ray tasks (one CPU each) on the cluster at `address`, or on a local Ray instance."""

    def __init__(self, address: str | None, workers: int, shipped):
        try:
            import ray
        except ImportError:
            raise DlnError("--executor ray needs Ray: pip install 'dlnc[ray]' (or pip install ray), on this machine "
                           "and on every node of the cluster", path="dlnc search") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"runtime_env": ray_runtime_env(), "log_to_driver": False,
                                       "include_dashboard": False}
            if address:
                options["address"] = address
            else:
                options["num_cpus"] = workers
            try:
                ray.init(**options)
            except Exception as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise DlnError(f"cannot connect to {where}: {type(exc).__name__}: {exc}", path="dlnc search") from None
            self.started = True
        self.remote = ray.remote(num_cpus=1, max_retries=0)(run_trial)
        self.shipped = ray.put(shipped)

    def map(self, jobs: Sequence[TrialJob]) -> Iterable[TrialResult]:
        refs = {self.remote.remote(job, self.shipped): job for job in jobs}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    yield self.ray.get(ref)
                except Exception as exc:        # the worker died (out of memory, a lost node)
                    job = refs[ref]
                    yield TrialResult(job.number, job.round, dict(job.values), "failed",
                                      reason=f"Ray task failed: {type(exc).__name__}: {str(exc)[:300]}")

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def ray_runtime_env() -> dict:
    """Ray workers import dlnc from this installation's packages, shipped with the job (so the
    cluster's nodes need Ray and dlnc's dependencies, not this checkout)."""
    import compiler
    import grammars
    import runtime
    return {"py_modules": [dsl, compiler, runtime, grammars]}


# ---------------------------------------------------------------- the search
@dataclass
class SearchResult:
    program: ast.Program
    trials: list[TrialResult]
    regions: list[tuple[Region, ...]]         # per round
    metric: str
    seconds: float
    compiles: int = 0

    def ranked(self) -> list[TrialResult]:
        ok = sorted((t for t in self.trials if t.status == "ok"), key=lambda t: (t.metric, t.number))
        return ok + sorted((t for t in self.trials if t.status != "ok"), key=lambda t: t.number)

    @property
    def best(self) -> TrialResult | None:
        ranked = self.ranked()
        return ranked[0] if ranked and ranked[0].status == "ok" else None


def check_search(program: ast.Program) -> ast.Search:
    if program.search is None:
        raise DlnError("this program has no search block; write one, like\n"
                       "  param lr = 0.01\n  search random trials=10 { lr = log_uniform(1e-4, 1e-1) }",
                       span=program.span, path=program.path, source=program.source)
    return program.search


def run_search(program: ast.Program, *, overrides: Mapping[str, str] | None = None,
               objective: Objective | None = None, executor: str = "local", workers: int = 1,
               address: str | None = None, threads: int | None = None, splits=None,
               on_result: Callable[[TrialResult], None] | None = None,
               on_round: Callable[[int, tuple[Region, ...]], None] | None = None) -> SearchResult:
    """Every round of the program's search; `objective` (values → metric, lower is better)
    replaces training, for tests of the search itself."""
    search = check_search(program)
    overrides = dict(overrides or {})
    searched = {d.name for d in search.dims}
    clash = searched & set(overrides)
    if clash:
        raise DlnError(f"--set {sorted(clash)[0]}=...: that param is searched; drop the --set or the search line",
                       path="dlnc search")
    shipped = (data_key(program), splits) if splits is not None else None
    if threads is None and objective is None:
        from .session import default_threads
        threads = max(1, default_threads() // max(1, workers)) if executor == "local" else 1
    pool = RayExecutor(address, workers, shipped) if executor == "ray" else LocalExecutor(workers, shipped)
    started = time.perf_counter()
    regions = initial_regions(search)
    history: list[tuple[Region, ...]] = []
    trials: list[TrialResult] = []
    seed = program.train.seed
    try:
        for round_number in range(1, search.rounds + 1):
            history.append(regions)
            if on_round is not None:
                on_round(round_number, regions)
            if search.kind == "grid":
                points = grid(regions)
            else:
                points = draw(regions, search.trials, np.random.default_rng([seed, 0x5EA7C4, round_number]))
            jobs = [TrialJob(len(trials) + i + 1, round_number, point, program.source or "", program.path, overrides,
                             search.metric, threads, objective) for i, point in enumerate(points)]
            results = []
            for result in pool.map(jobs):
                results.append(result)
                _keep_best_weights(trials + results, result)
                if on_result is not None:
                    on_result(result)
            results.sort(key=lambda r: r.number)
            trials.extend(results)
            ranked = [r.values for r in sorted((r for r in results if r.status == "ok"),
                                               key=lambda r: (r.metric, r.number))]
            regions = refine(regions, ranked)
    finally:
        pool.close()
    compiles = sum(1 for t in trials if t.compile_seconds > 0)
    return SearchResult(program, trials, history, search.metric, time.perf_counter() - started, compiles)


def _keep_best_weights(trials: list[TrialResult], new: TrialResult) -> None:
    """Only the best trial so far keeps its trained weights (for the export)."""
    ok = [t for t in trials if t.status == "ok" and t.result is not None]
    if not ok:
        return
    best = min(ok, key=lambda t: (t.metric, t.number))
    for t in ok:
        if t is not best:
            t.result = None


# ---------------------------------------------------------------- results
def columns(result: SearchResult) -> list[str]:
    names = [d.name for d in result.program.search.dims]
    splits = sorted({s for t in result.trials for s in t.splits}, key=["train", "train_dev", "dev", "test"].index)
    return (["rank", "trial", "round", *names, result.metric]
            + [f"{s}_{k}" for s in splits for k in ("loss", "error") if f"{s}_{k}" != result.metric]
            + ["epochs", "train_s", "compile_s", "session_s", "graph", "status", "reason"])


def rows(result: SearchResult) -> list[dict]:
    out = []
    for rank, t in enumerate(result.ranked(), start=1):
        row = {"rank": rank if t.status == "ok" else "", "trial": t.number, "round": t.round, **t.values,
               result.metric: t.metric if t.metric is not None else "", "epochs": t.epochs,
               "train_s": round(t.train_seconds, 3), "compile_s": round(t.compile_seconds, 3),
               "session_s": round(t.session_seconds, 3),
               "graph": "reused" if t.reused else ("compiled" if t.compile_seconds else ""),
               "status": t.status, "reason": t.reason}
        for split, m in t.splits.items():
            for kind in ("loss", "error"):
                if f"{split}_{kind}" != result.metric:
                    row[f"{split}_{kind}"] = m[kind]
        out.append(row)
    return out


def csv_text(result: SearchResult) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(result), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows(result))
    return buffer.getvalue()


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def table_text(result: SearchResult, limit: int | None = None) -> str:
    """The trials sorted by the metric (failed ones last, with their reasons below)."""
    names = [d.name for d in result.program.search.dims]
    shown = ["rank", "trial", "round", *names, result.metric] + \
        [c for c in ("dev_loss", "dev_error", "train_error") if c != result.metric] + ["epochs", "train_s", "graph"]
    table = [row for row in rows(result) if row["status"] == "ok"]
    failed = [row for row in rows(result) if row["status"] != "ok"]
    if limit is not None:
        table = table[:limit]
    cells = [[_cell(row.get(c, "")) for c in shown] for row in table]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(shown)]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip()
    out = [line(shown), "  ".join("-" * w for w in widths), *map(line, cells)]
    for row in failed:
        values = ", ".join(f"{n}={_cell(row[n])}" for n in names)
        out.append(f"failed: trial {row['trial']} (round {row['round']}, {values}): {row['reason']}")
    return "\n".join(out)


def saving_text(result: SearchResult) -> str:
    """How much the reuse of compiled graphs and sessions saved."""
    fresh = [t for t in result.trials if t.compile_seconds > 0]
    reused = [t for t in result.trials if t.reused]
    if not fresh:
        return ""
    per_trial = sum(t.compile_seconds + t.session_seconds for t in fresh) / len(fresh)
    compile_s = sum(t.compile_seconds for t in fresh) / len(fresh)
    session_s = sum(t.session_seconds for t in fresh) / len(fresh)
    return (f"graphs: {len(fresh)} compiled (one per architecture and worker), {len(reused)} trials reused one; "
            f"a compile took {compile_s:.3f} s and opening its two sessions {session_s:.3f} s, so reuse saved "
            f"{per_trial:.3f} s a trial, {per_trial * len(reused):.2f} s in all")


def summary_json(result: SearchResult) -> dict:
    best = result.best
    return {"model": result.program.name, "kind": result.program.search.kind, "metric": result.metric,
            "rounds": [[asdict(r) for r in regions] for regions in result.regions],
            "trials": [t.row() for t in sorted(result.trials, key=lambda t: t.number)],
            "best": None if best is None else {"trial": best.number, "values": best.values, "metric": best.metric},
            "seconds": result.seconds}


def search_png(result: SearchResult) -> bytes:
    """The metric against each searched param, one panel each, coloured by round; a log x-axis
    for log-scaled params; words (choice of names) as categories."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    dims = result.program.search.dims
    first = result.regions[0] if result.regions else ()
    logs = {r.name: r.log for r in first}
    figure = Figure(figsize=(4 * len(dims), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(1, len(dims), squeeze=False)[0]
    ok = [t for t in result.trials if t.status == "ok"]
    rounds = sorted({t.round for t in ok}) or [1]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    best = result.best
    for axes, dim in zip(axes_list, dims):
        numeric = all(_is_number(t.values.get(dim.name)) for t in ok)
        categories = sorted({str(t.values.get(dim.name)) for t in ok}) if not numeric else []
        for number in rounds:
            points = [t for t in ok if t.round == number]
            xs = [t.values[dim.name] if numeric else categories.index(str(t.values[dim.name])) for t in points]
            axes.scatter(xs, [t.metric for t in points], s=18, color=colours[(number - 1) % len(colours)],
                         label=f"round {number}")
        if best is not None:
            x = best.values[dim.name] if numeric else categories.index(str(best.values[dim.name]))
            axes.scatter([x], [best.metric], s=90, facecolors="none", edgecolors="black", label="best")
        if numeric and logs.get(dim.name):
            axes.set_xscale("log")
        if not numeric:
            axes.set_xticks(range(len(categories)), categories)
        axes.set(xlabel=dim.name + (" (log scale)" if logs.get(dim.name) else ""), ylabel=result.metric)
        axes.grid(True, alpha=0.3)
    axes_list[0].legend(fontsize="small")
    failed = len(result.trials) - len(ok)
    figure.suptitle(f"{result.program.name}: {result.metric} per trial"
                    + (f" ({failed} failed trials not shown)" if failed else ""))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def export_best(result: SearchResult, splits, folder: Path, overrides: Mapping[str, str],
                source_hash: str) -> dict | None:
    """The best trial's run folder, as `dlnc run` writes it (model.onnx, report, curves, metrics,
    config.json, train_step.onnx), from the weights its trial trained."""
    from . import report
    from .cli import compile_with_data
    from .files import write_atomic
    from .run import finish
    best = result.best
    if best is None or best.result is None:
        return None
    program = dsl.load(result.program.source or "", result.program.path, trial_overrides(overrides, best.values))
    if data_key(program) != data_key(result.program):           # a searched param changed the data block
        from .cli import load_data
        splits = load_data(program)
    compiled = compile_with_data(program, splits)
    config = report.config_json(program, source_hash, compiled=compiled, data_hash=splits.source_hash)
    config["search_trial"] = best.number
    write_atomic(folder / "config.json", json.dumps(config, indent=2).encode())
    write_atomic(folder / "train_step.onnx", compiled.train_step.SerializeToString())
    summary = finish(program, compiled, splits, best.result, folder, config)
    summary.pop("text", None)
    return summary
