"""The dlnc benchmark: training steps/s against PyTorch eager, JAX and onnxruntime-training,
side by side in one invocation, with the float32 matrix-product peak measured in the same run.

    python bench/run.py                 # the full table (about two minutes on 2 cores)
    python bench/run.py --quick         # a smoke test in seconds (CI); no timing is asserted
    python bench/run.py --peers dlnc,torch --models mlp --batches 32 --rounds 9
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py   # as the numbers are quoted

Every peer runs in a worker process of its own (bench/peers/*_worker.py), JAX and
onnxruntime-training with the Python of their own virtual environments (bench/setup_peers.sh).
For each model and batch size the harness warms every peer up, sizes one round to about
--round-seconds per peer, then runs --rounds rounds, the peers interleaved (a different order
each round) so that load from other processes falls on all of them alike. Before each round it
pauses --settle seconds: a peer's idle thread pool spins on after its round (ONNX Runtime's does),
and without the pause that spinning lands on the next peer's round (measured: dlnc and
onnxruntime-training each lost 5–15 % when run side by side; bench/NOTES.md section 14). It prints the median
steps/s, the ratios, dlnc's achieved GFLOP/s and its fraction of the numpy float32 matmul peak,
then compile time per example, inference latency per batch, and the peak RSS of every worker.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

MODELS = {"mlp": "mlp.dln", "lenet5": "lenet5.dln", "gru_char": "gru_char.dln"}
CONFIGS = [("mlp", 32), ("mlp", 128), ("mlp", 512), ("lenet5", 64), ("gru_char", 32)]
PEERS = ("dlnc", "torch", "jax", "ortt")
PEER_TITLES = {"dlnc": "dlnc", "torch": "torch", "jax": "jax", "ortt": "ort-train"}
VENVS = {"jax": "BENCH_JAX_PYTHON", "ortt": "BENCH_ORTT_PYTHON"}   # or $BENCH_VENVS/<peer>/bin/python
PEER_MODELS: dict[str, set[str]] = {}          # the models a peer implements (default: all)
INFER_BATCHES = (1, 32, 128, 512)
QUIET = 0.1          # cores: a timed round during which other processes used less is "quiet"
TEXT_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;"
# glibc's malloc maps every block over its mmap threshold (128 KiB at first, raised as such blocks
# are freed) with mmap and returns free heap tops above its trim threshold to the kernel, so a
# step's large temporaries can be mapped, faulted in page by page, and unmapped again every step,
# or not, as the allocation history of the process happens to go. PyTorch's CPU allocator calls
# malloc for every tensor: its LeNet-5 ran 235 steps/s with 1366 page faults a step and 362 with
# none (bench/NOTES.md section 16). Every worker gets these two settings, so that no peer's speed
# depends on that history; --stock-malloc leaves glibc as it is.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


# ---------------------------------------------------------------- workers
class Worker:
    """One peer's worker process, spoken to with bench/peers/protocol.py's JSON lines."""

    def __init__(self, peer: str, python: str, threads: int, steady_malloc: bool = True):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(BENCH / "peers")
        if steady_malloc:
            env.update(STEADY_MALLOC)
        if peer == "jax":
            env.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true "
                                        f"intra_op_parallelism_threads={threads}")
        self.peer = peer
        self.proc = subprocess.Popen([python, str(BENCH / "peers" / f"{peer}_worker.py")], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.stderr: list[str] = []

    def ask(self, **request) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            line = ""
            self.stderr.append(str(exc))
        if not line:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            last = [x for x in err.strip().splitlines() if x.strip()][-1:] or ["worker exited"]
            return {"ok": False, "reason": f"{self.peer} worker failed: {last[0]}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def peer_python(peer: str) -> str | None:
    """The interpreter of a peer: this one for dlnc and torch, its own venv for jax and ortt."""
    if peer not in VENVS:
        return sys.executable
    default = Path(os.environ.get("BENCH_VENVS", "/work/venvs")) / peer / "bin" / "python"
    path = os.environ.get(VENVS[peer], str(default))
    return path if Path(path).is_file() else None


def gpu_peers() -> set[str]:
    """The peers that --device cuda runs on the GPU: dlnc and PyTorch from this interpreter, and
    JAX only from an interpreter that $BENCH_JAX_PYTHON names (bench/setup_peers.sh's JAX venv is a
    CPU build); never onnxruntime-training, whose 1.19.2 wheel here is a CPU build."""
    return {"dlnc", "torch"} | ({"jax"} if os.environ.get(VENVS["jax"]) else set())


# ---------------------------------------------------------------- results
@dataclass
class PeerResult:
    steps_per_s: float | None = None
    rounds: list[float] = field(default_factory=list)
    reason: str = ""
    peak_rss_mb: float | None = None
    info: dict = field(default_factory=dict)
    infer_s: dict = field(default_factory=dict)
    faults_per_step: float | None = None   # minor page faults per training step (median of the rounds kept)


@dataclass
class ConfigResult:
    model: str
    batch: int
    peers: dict[str, PeerResult]
    train_flops: int | None = None      # per example per step, from dlnc's layer table
    others_load: float | None = None    # cores other processes kept busy during the timed rounds


# ---------------------------------------------------------------- measurements
def others_cpu_seconds(own: set[int]) -> float | None:
    """CPU seconds used so far by everything but the harness and its workers (Linux /proc):
    all busy time in /proc/stat less the processes in `own`, so short-lived processes that
    start and end between two readings are counted too."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        busy = sum(fields[:8]) - fields[3] - fields[4]          # all but idle and iowait (no guest)
        mine = 0
        for pid in own:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            mine += int(stat[11]) + int(stat[12])               # utime + stime, all threads
    except (OSError, ValueError, IndexError):
        return None
    return (busy - mine) / tick


def matmul_peak(n: int, repeats: int = 5) -> float:
    """Median GFLOP/s of numpy float32 n×n matrix products."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def architecture(path: Path) -> dict:
    """What the peers need to build the same network as the .dln declares."""
    import dsl
    from dsl import ast
    program = dsl.load_file(str(path))
    arch: dict = {}
    if all(isinstance(layer, ast.Dense) for layer in program.layers) and program.input.kind == "float":
        arch = {"input": int(program.input.shape[0]),
                "layers": [[int(layer.units), layer.activation.kind] for layer in program.layers]}
    if program.input.kind == "tokens":
        arch = {"vocab": len(TEXT_ALPHABET), "embed": 32, "hidden": 128,
                "steps": int(program.data.sequence_length or 32) if program.data else 32}
        for layer in program.layers:
            if isinstance(layer, ast.Embed):
                arch["embed"] = int(layer.dim)
            if isinstance(layer, ast.Recurrent):
                arch["hidden"] = int(layer.units)
    return arch


def prepare_models(folder: Path) -> None:
    """Copy the model files into a scratch folder beside a synthetic text for the char model."""
    for name in MODELS.values():
        shutil.copy(BENCH / "models" / name, folder / name)
    rng = np.random.default_rng(0)
    letters = np.array(list(TEXT_ALPHABET))
    lines = ["".join(rng.choice(letters, size=48)) for _ in range(2000)]
    (folder / "bench_text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_config(model: str, batch: int, peers: list[str], args, folder: Path, log,
               pool: dict[str, "Worker"]) -> ConfigResult:
    path = folder / MODELS[model]
    arch = architecture(path)
    results = {peer: PeerResult() for peer in peers}
    workers: dict[str, Worker] = {}
    for peer in peers:
        if model not in PEER_MODELS.get(peer, {model}):
            results[peer].reason = "—"
            continue
        if args.device == "cuda" and peer not in gpu_peers():
            results[peer].reason = ("CPU-only environment (bench/setup_peers.sh installs CPU builds; for JAX on "
                                    f"the GPU, set ${VENVS['jax']} to a Python with jax[cuda])")
            continue
        python = peer_python(peer)
        if python is None:
            results[peer].reason = "not installed (bench/setup_peers.sh)"
            continue
        worker = pool.pop(peer, None) or Worker(peer, python, args.threads, not args.stock_malloc)
        reply = worker.ask(op="setup", model=model, batch=batch, threads=args.threads, path=str(path),
                           arch=arch, device=args.device, sync_every_step=args.jax_sync)
        if not reply["ok"]:
            results[peer].reason = reply["reason"]
            if args.quick and worker.proc.poll() is None:
                pool[peer] = worker
            else:
                worker.close()
            continue
        results[peer].info = reply["info"]
        workers[peer] = worker
    steps: dict[str, int] = {}
    for peer, worker in list(workers.items()):
        reply = worker.ask(op="time", steps=args.warmup)
        if reply["ok"]:
            reply = worker.ask(op="time", steps=args.warmup)          # the size of one round
        if not reply["ok"]:
            results[peer].reason = reply["reason"]
            worker.close()
            del workers[peer]
            continue
        per_step = reply["seconds"] / args.warmup
        steps[peer] = max(args.min_steps, int(args.round_seconds / max(per_step, 1e-9)))
    order = list(workers)
    exclude = {os.getpid()} | {w.proc.pid for w in workers.values()}
    timed: dict[str, list[tuple[float, float, float]]] = {peer: [] for peer in workers}   # (others' load, steps/s, faults/step)

    def enough_quiet() -> bool:
        return all(sum(1 for load, _, _ in timed[p] if load < QUIET) >= args.rounds for p in workers)

    r = 0
    while r < args.rounds or (r < args.max_rounds and not enough_quiet()):
        for peer in order[r % max(len(order), 1):] + order[:r % max(len(order), 1)]:
            time.sleep(args.settle)     # the last peer's idle pool threads stop spinning before this round
            before, start = others_cpu_seconds(exclude), time.perf_counter()
            reply = workers[peer].ask(op="time", steps=steps[peer])
            after, elapsed = others_cpu_seconds(exclude), time.perf_counter() - start
            if reply["ok"]:
                # /proc counts in 10 ms ticks: ± 0.03 cores over a 0.4 s round
                load = max(0.0, (after - before) / elapsed) if before is not None and after is not None else 0.0
                timed[peer].append((load, steps[peer] / reply["seconds"], reply.get("faults", 0) / steps[peer]))
        r += 1
    loads = []
    for peer, runs in timed.items():
        chosen = sorted(runs, key=lambda run: run[0])[:args.rounds]     # the least disturbed rounds
        results[peer].rounds = [rate for _, rate, _ in chosen]
        results[peer].faults_per_step = statistics.median(faults for _, _, faults in chosen) if chosen else None
        loads += [load for load, _, _ in chosen]
    load = statistics.mean(loads) if loads else None
    for peer, worker in workers.items():
        result = results[peer]
        if result.rounds:
            result.steps_per_s = statistics.median(result.rounds)
        if model == "mlp" and batch == args.infer_with and peer in ("dlnc", "torch", "jax"):
            for b in INFER_BATCHES:
                reply = worker.ask(op="infer", batch=b, reps=args.infer_reps)
                if reply["ok"]:
                    result.infer_s[b] = reply["seconds"]
        reply = worker.ask(op="rss")
        if reply["ok"]:
            result.peak_rss_mb = reply["peak_rss_mb"]
        if args.quick:
            pool[peer] = worker          # --quick reuses one process per peer (RSS then accumulates)
        else:
            worker.close()
    dlnc = results.get("dlnc")
    flops = dlnc.info.get("train_flops") if dlnc is not None and dlnc.info else None
    config = ConfigResult(model, batch, results, flops, load)
    log(f"  {model} batch {batch}: " + ", ".join(
        f"{p} {r.steps_per_s:.0f}/s" if r.steps_per_s else f"{p} –" for p, r in results.items()))
    return config


def compile_times(repeats: int) -> list[tuple[str, float | None, str]]:
    """Per example: median seconds from .dln text to serialised ONNX (both models), data loading
    excluded; parse, checks, lowering, autodiff, simplification, emission and the ONNX checker."""
    import dsl
    from compiler.program import compile_program
    rows = []
    for path in sorted((ROOT / "examples").glob("*.dln")):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            compiled = compile_program(dsl.load_file(str(path)))
            compiled.model.SerializeToString()
            compiled.train_step.SerializeToString()
            times.append(time.perf_counter() - start)
        rows.append((path.name, statistics.median(times), ""))
    return rows


# ---------------------------------------------------------------- the table
def fmt_rate(r: PeerResult) -> str:
    if r.steps_per_s is not None:
        return f"{r.steps_per_s:.0f}"
    if r.reason.startswith("not available yet"):
        return "not available yet"
    if r.reason.startswith("not installed"):
        return "not installed"
    return "—" if r.reason == "—" else "failed"


def render(configs: list[ConfigResult], peers: list[str], peak: float, compile_rows, args) -> str:
    lines = []
    openblas = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    lines.append(f"dlnc benchmark: {args.threads} threads, device {args.device}, "
                 f"{'--quick smoke test: one short round, the timings mean nothing' if args.quick else f'after warm-up, the median of each peer’s {args.rounds} least disturbed rounds of up to {args.max_rounds}'}")
    lines.append(f"float32 matmul peak (numpy, {args.peak_n}×{args.peak_n}, median of 5): {peak:.1f} GFLOP/s"
                 + (f"   [note: {openblas} set; unset them for the reference peak]" if openblas else ""))
    lines.append("glibc malloc: " + ("as installed (--stock-malloc): a peer's speed may depend on its allocation history"
                                     if args.stock_malloc else
                                     "every worker with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 256 MiB "
                                     "(no per-step mmap and page faults; --stock-malloc to leave glibc as it is)"))
    if args.device == "cuda":
        lines.append("note: --device cuda; the peak above is the CPU's, so '% peak' compares against the CPU")
    lines.append("")
    others = [p for p in peers if p != "dlnc"]
    head = ["model", "batch"] + [f"{PEER_TITLES[p]} st/s" for p in peers] + \
           [f"÷{PEER_TITLES[p]}" for p in others] + ["GFLOP/s", "% peak", "MFLOP/step", "others' load"]
    rows = [head]
    notes = []
    for c in configs:
        d = c.peers.get("dlnc")
        row = [c.model, str(c.batch)] + [fmt_rate(c.peers[p]) for p in peers]
        for p in others:
            o = c.peers[p]
            row.append(f"{d.steps_per_s / o.steps_per_s:.2f}×" if d and d.steps_per_s and o.steps_per_s else "—")
        if d and d.steps_per_s and c.train_flops:
            gflops = d.steps_per_s * c.train_flops * c.batch / 1e9
            row += [f"{gflops:.1f}", f"{100 * gflops / peak:.0f}%", f"{c.train_flops * c.batch / 1e6:.1f}"]
        else:
            row += ["—", "—", "—"]
        row.append(f"{c.others_load:.2f} cores" if c.others_load is not None else "—")
        rows.append(row)
        for p in peers:
            r = c.peers[p]
            if r.steps_per_s is None and r.reason and r.reason != "—":
                notes.append(f"  {c.model} batch {c.batch}, {PEER_TITLES[p]}: {r.reason}")
    lines += table(rows)
    lines.append("  st/s: training steps per second (median); ÷peer: dlnc's steps/s over the peer's; "
                 "GFLOP/s and % peak: dlnc's, counting 3× the forward FLOPs less the first layer's input gradient;")
    lines.append("  others' load: CPU cores that other processes kept busy during the rounds kept (each peer's "
                 f"{args.rounds} least disturbed of up to {args.max_rounds}); on a loaded machine every peer slows "
                 "down, multi-threaded steps most")
    if notes:
        lines.append("")
        lines += notes
    lines.append("")
    lines.append("minor page faults per training step (median of the rounds kept):")
    rows = [["model", "batch"] + [PEER_TITLES[p] for p in peers]]
    for c in configs:
        rows.append([c.model, str(c.batch)] + [f"{c.peers[p].faults_per_step:.0f}" if c.peers[p].faults_per_step is not None
                                               else "—" for p in peers])
    lines += table(rows)
    # goals (issue 7)
    lines.append("")
    lines.append("goals:")
    for c in configs:
        d = c.peers.get("dlnc")
        if c.model != "mlp" or d is None or d.steps_per_s is None:
            continue
        if c.batch in (32, 128):
            fast = [c.peers[p].steps_per_s for p in ("jax", "ortt") if p in c.peers and c.peers[p].steps_per_s]
            if fast:
                ratio = d.steps_per_s / max(fast)
                lines.append(f"  mlp {c.batch}: ≥ 1.0× the faster of jax and ort-train: {ratio:.2f}× "
                             f"{'met' if ratio >= 1.0 else 'NOT met'}")
            t = c.peers.get("torch")
            if t is not None and t.steps_per_s:
                ratio = d.steps_per_s / t.steps_per_s
                lines.append(f"  mlp {c.batch}: ≥ 1.8× torch eager: {ratio:.2f}× {'met' if ratio >= 1.8 else 'NOT met'}")
        if c.batch == 512 and c.train_flops:
            frac = d.steps_per_s * c.train_flops * c.batch / 1e9 / peak
            lines.append(f"  mlp 512: ≥ 60% of the matmul peak: {100 * frac:.1f}% {'met' if frac >= 0.6 else 'NOT met'}")
    for c in configs:
        d, t = c.peers.get("dlnc"), c.peers.get("torch")
        if c.model in ("lenet5", "gru_char") and d is not None and t is not None:
            if d.steps_per_s and t.steps_per_s:
                ratio = d.steps_per_s / t.steps_per_s
                lines.append(f"  {c.model} {c.batch}: ≥ 1.5× torch eager: {ratio:.2f}× "
                             f"{'met' if ratio >= 1.5 else 'NOT met'}")
            else:
                lines.append(f"  {c.model} {c.batch}: ≥ 1.5× torch eager: {d.reason or 'no result'}")
        o = c.peers.get("ortt")
        if c.model == "lenet5" and d is not None and o is not None:     # issue 3: ≥ 1.0× onnxruntime-training
            if d.steps_per_s and o.steps_per_s:
                ratio = d.steps_per_s / o.steps_per_s
                lines.append(f"  {c.model} {c.batch}: ≥ 1.0× ort-train: {ratio:.2f}× {'met' if ratio >= 1.0 else 'NOT met'}")
            else:
                lines.append(f"  {c.model} {c.batch}: ≥ 1.0× ort-train: {d.reason or o.reason or 'no result'}")
    if compile_rows:
        worst = max((s for _, s, _ in compile_rows if s is not None), default=None)
        if worst is not None:
            lines.append(f"  compile < 0.5 s for every example: slowest {worst:.3f} s {'met' if worst < 0.5 else 'NOT met'}")
    # compile times
    lines.append("")
    lines.append("compile time, .dln → ONNX (both models, checker included, data loading excluded), median of "
                 f"{args.compile_repeats}:")
    lines += table([["example", "seconds"]] + [[name, f"{s:.3f}" if s is not None else why]
                                               for name, s, why in compile_rows])
    # inference
    infer_peers = [p for p in peers if any(c.peers.get(p) and c.peers[p].infer_s for c in configs)]
    if infer_peers:
        lines.append("")
        lines.append(f"inference latency of the exported MLP, median of {args.infer_reps} calls "
                     "(dlnc: model.onnx on onnxruntime):")
        rows = [["batch"] + [f"{PEER_TITLES[p]} µs" for p in infer_peers]]
        source = {p: next(c.peers[p].infer_s for c in configs if c.peers.get(p) and c.peers[p].infer_s)
                  for p in infer_peers}
        for b in INFER_BATCHES:
            rows.append([str(b)] + [f"{source[p][b] * 1e6:.0f}" if b in source[p] else "—" for p in infer_peers])
        lines += table(rows)
    # memory
    lines.append("")
    lines.append("peak RSS of each worker process, MB:")
    rows = [["model", "batch"] + [PEER_TITLES[p] for p in peers]]
    for c in configs:
        rows.append([c.model, str(c.batch)] + [f"{c.peers[p].peak_rss_mb:.0f}" if c.peers[p].peak_rss_mb else "—"
                                               for p in peers])
    lines += table(rows)
    return "\n".join(lines)


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, row in enumerate(rows):
        cells = [cell.ljust(w) if i < 1 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        out.append("  " + "  ".join(cells))
        if k == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke test in seconds: MLP batch 32, one short round")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated: dlnc,torch,jax,ortt")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp,lenet5,gru_char")
    parser.add_argument("--batches", default="", help="MLP batch sizes (default 32,128,512)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-rounds", type=int, default=15,
                        help="run up to this many rounds until every peer has --rounds quiet ones; each peer's "
                             "median is over its --rounds least disturbed rounds")
    parser.add_argument("--round-seconds", type=float, default=0.4)
    parser.add_argument("--settle", type=float, default=0.05,
                        help="seconds to pause before each timed round, so that the previous peer's idle "
                             "thread pools stop spinning (ONNX Runtime's spin on after a run)")
    parser.add_argument("--jax-sync", action="store_true",
                        help="JAX reads the loss back every step, as dlnc and onnxruntime-training do "
                             "(default: once a round, keeping JAX's asynchronous dispatch)")
    parser.add_argument("--stock-malloc", action="store_true",
                        help="leave glibc's malloc thresholds as installed (default: STEADY_MALLOC in every worker)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.warmup, args.min_steps, args.peak_n, args.compile_repeats, args.infer_reps = 30, 5, 2048, 3, 50
    if args.quick:
        args.rounds, args.max_rounds, args.round_seconds, args.warmup, args.min_steps = 1, 1, 0.05, 3, 3
        args.settle = 0.0
        args.peak_n, args.compile_repeats, args.infer_reps = 512, 1, 3
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown or "dlnc" not in peers:
        parser.error(f"--peers takes dlnc (required) and any of {', '.join(PEERS[1:])}; got {args.peers}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()] if args.batches else None
    configs = [(m, b) for m, b in CONFIGS if m in models]
    if batches is not None:
        configs = [(m, b) for m, b in configs if m != "mlp"] + [("mlp", b) for b in batches if "mlp" in models]
        configs.sort(key=lambda c: list(MODELS).index(c[0]))
    if args.quick:
        configs = [(m, b) for m, b in configs if m != "mlp" or b == (batches or [32])[0]]
    args.infer_with = next((b for m, b in configs if m == "mlp"), None)
    log = (lambda s: print(s, file=sys.stderr, flush=True))
    log(f"bench: {len(configs)} configurations × peers {','.join(peers)} on {args.threads} threads")
    peak_before = matmul_peak(args.peak_n)
    results = []
    with tempfile.TemporaryDirectory(prefix="dlnc-bench-") as scratch:
        folder = Path(scratch)
        prepare_models(folder)
        pool: dict[str, Worker] = {}
        for model, batch in configs:
            results.append(run_config(model, batch, peers, args, folder, log, pool))
        for worker in pool.values():
            worker.close()
    compile_rows = compile_times(args.compile_repeats)
    peak = max(peak_before, matmul_peak(args.peak_n))
    print(render(results, peers, peak, compile_rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "threads": args.threads, "device": args.device, "peak_gflops": peak,
            "malloc": "stock" if args.stock_malloc else STEADY_MALLOC,
            "configs": [{"model": c.model, "batch": c.batch, "train_flops": c.train_flops, "others_load": c.others_load,
                         "peers": {p: vars(r) for p, r in c.peers.items()}} for c in results],
            "compile": [{"example": n, "seconds": s, "note": w} for n, s, w in compile_rows]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
