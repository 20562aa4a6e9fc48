"""In-process A/B of the training step's variants on one device, interleaved rounds (bench/NOTES.md):

- as built: what `dlnc run` runs;
- on the CPU, joined: the gradients joined by the step's Concat, as on CUDA;
- on the CPU, exported moments: the optimiser's moments kept as `train_step.onnx` keeps them, not
  folded (`compiler.program.RunnerStep`), as on CUDA;
- on CUDA, in place: the gradients written in place (`compiler.gradients_in_place`), as on the CPU;
- on CUDA, tf32: TensorFloat-32 on (ONNX Runtime's default; dlnc turns it off);
- on CUDA, 1 thread: an intra-op pool of one thread (the default is one per core; on CUDA the
  pool runs only the few nodes left on the CPU, and its threads spin between them).

Usage: python bench/gpu/ab_step.py [--device cuda] [--rounds 5] [--seconds 0.3]
Prints steps/s per variant and model, and each variant's median per-round ratio to "as built"."""
from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from steps import compiled_with_batches, models_folder, steps_per_second

from runtime import session

CONFIGS = [("mlp", 32), ("mlp", 512), ("gru_char", 32)]


def variants(device: str, threads: int) -> dict[str, tuple[dict, int]]:
    """name -> (the module attributes that variant replaces while its runner is built, threads)."""
    built = session.training_graph
    exported = {"training_graph": lambda compiled, device, folded=None: built(replace(compiled, runner_step=None),
                                                                              device)}
    if device == "cpu":
        return {"as built": ({}, threads),
                "joined": ({"training_graph": lambda compiled, device, folded=None: built(compiled, device, True)},
                           threads),
                "exported moments": (exported, threads)}
    in_place = {"training_graph": lambda compiled, device, folded=None: built(replace(compiled, runner_step=None),
                                                                              "cpu")}
    tf32 = {"PROVIDERS": {**session.PROVIDERS, "cuda": [("CUDAExecutionProvider", {"use_tf32": "1"}),
                                                       "CPUExecutionProvider"]}}
    return {"as built": ({}, threads), "in place": (in_place, threads), "tf32": (tf32, threads),
            "1 thread": ({}, 1)}


def runner_with(compiled, device: str, threads: int, replaced: dict) -> session.StepRunner:
    saved = {name: getattr(session, name) for name in replaced}
    try:
        for name, value in replaced.items():
            setattr(session, name, value)
        return session.StepRunner(compiled, device, threads)
    finally:
        for name, value in saved.items():
            setattr(session, name, value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    args = parser.parse_args()
    folder = models_folder()
    for model, batch in CONFIGS:
        compiled, batches = compiled_with_batches(folder, model, batch)
        runners = {name: runner_with(compiled, args.device, threads, replaced)
                   for name, (replaced, threads) in variants(args.device, args.threads).items()}
        for runner in runners.values():                    # warm-up (cuDNN's algorithm search, allocations)
            for i in range(20):
                runner.step(batches[i % len(batches)])
        rates: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                rates[name].append(steps_per_second(runner, batches, args.seconds))
        base = rates["as built"]
        cells = [f"{name} {statistics.median(r):.0f}/s"
                 + ("" if name == "as built" else f" ({statistics.median(a / b for a, b in zip(r, base)):.3f})")
                 for name, r in rates.items()]
        provider = runners["as built"].session.get_providers()[0]
        print(f"{model} batch {batch} [{provider}]: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
