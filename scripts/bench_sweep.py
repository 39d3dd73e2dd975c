"""Tuning the head: 9 jobs, 9 jobs sharing --feature_cache, and one --head_sweep job.

    python scripts/bench_sweep.py [--data=DIR] [--images=900] [--epochs=10] [--image_size=160]
                                  [--rounds=3] [--base_weights=FILE]

Over the grid learning_rate 1e-4, 3e-4, 1e-3 x dropout 0, 0.2, 0.5 (9 heads), phase 1 only:
A. 9 single-head jobs one after another, as a tuning job's trials run: each its own process
   and its own backbone pass;
B. the same 9 jobs sharing a --feature_cache folder (empty at the start of each round): the
   first computes the backbone pass and keeps it, the 8 others read it;
C. one job with --head_sweep over the grid.
Each job is a process of its own on the same data (bench_train.py's photo-like JPEGs),
weights, image size, batch, epochs and seed, timed from the outside. The best head is the one
with the highest validation accuracy (ties: the lower validation loss), as --head_sweep
chooses; it must be the same head at the same accuracy in A, B and C. The table gives medians
over the rounds, which take turns A, B, C.
"""

import json
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402  (scripts/ is not a package)

from trainer import sweep  # noqa: E402  (bench_train puts the repository on the path)

LEARNING_RATES = ("1e-4", "3e-4", "1e-3")
DROPOUTS = ("0", "0.2", "0.5")
GRID = f"learning_rate={','.join(LEARNING_RATES)};dropout={','.join(DROPOUTS)}"


def job(data, weights, args, model_dir, *flags):
    """(process seconds, metrics.json) of one phase-1 job."""
    seconds, _, _ = bench_train.timed([
        sys.executable, "-m", "trainer.task", f"--data={data}", f"--model_dir={model_dir}",
        "--overwrite", "--backbone=mobilenet_v2", f"--base_weights={weights}",
        f"--image_size={args.image_size}", f"--batch_size={args.batch_size}",
        f"--epochs={args.epochs}", "--fine_tune_epochs=0", "--seed=0", "--strategy=cpu",
        *flags])
    with open(os.path.join(model_dir, "metrics.json")) as handle:
        return seconds, json.load(handle)


def nine_jobs(data, weights, args, workdir, shared=None):
    """(process seconds of all 9, phase-1 seconds of each, the best head's (settings, final
    record))."""
    seconds, heads, results = 0.0, [], []
    for rate in LEARNING_RATES:
        for dropout in DROPOUTS:
            extra = [f"--feature_cache={shared}"] if shared else []
            taken, metrics = job(data, weights, args, os.path.join(workdir, "job"),
                                 f"--learning_rate={rate}", f"--dropout={dropout}", *extra)
            seconds += taken
            heads.append(metrics["phase_seconds"]["head"])
            results.append(({"learning_rate": float(rate), "dropout": float(dropout)},
                            metrics["history"]))
    best = sweep.choose([history for _, history in results])
    return seconds, heads, (results[best][0], results[best][1][-1])


def one_sweep(data, weights, args, workdir):
    seconds, metrics = job(data, weights, args, os.path.join(workdir, "sweep"),
                           f"--head_sweep={GRID}")
    swept = metrics["head_sweep"]
    chosen = swept["heads"][swept["chosen"]]
    settings = {name: chosen["settings"][name] for name in ("learning_rate", "dropout")}
    return seconds, metrics["phase_seconds"]["head"], (settings, chosen["history"][-1])


def main():
    args = bench_train.arguments(__doc__.splitlines()[0], "of phase 1")
    workdir, data, weights = bench_train.set_up(args, "bench-sweep-")

    rounds = {"A": [], "B": [], "C": []}
    single_phase1 = []  # phase-1 seconds of a single-head job, A's
    for _ in range(args.rounds):
        seconds, heads, best = nine_jobs(data, weights, args, workdir)
        rounds["A"].append((seconds, best))
        single_phase1.append(statistics.median(heads))
        shared = os.path.join(workdir, "feature_cache")
        shutil.rmtree(shared, ignore_errors=True)
        seconds, _, best = nine_jobs(data, weights, args, workdir, shared)
        rounds["B"].append((seconds, best))
        seconds, phase1, best = one_sweep(data, weights, args, workdir)
        rounds["C"].append((seconds, best, phase1))

    wall = {name: statistics.median(row[0] for row in rows) for name, rows in rounds.items()}
    print(f"{args.images} images, MobileNetV2 at {args.image_size} px, phase 1 only: "
          f"{args.epochs} epochs, batch {args.batch_size}; grid {GRID} (9 heads); "
          f"{os.cpu_count()} CPUs; medians of {args.rounds} round(s)")
    print(f"{'run':<40}{'wall s':>9}{'x A':>7}  {'best head':<34}{'val acc':>9}{'val loss':>10}")
    labels = {"A": "A 9 single-head jobs", "B": "B 9 jobs sharing --feature_cache",
              "C": "C 1 job --head_sweep"}
    bests = set()
    for name, rows in rounds.items():
        settings, record = rows[-1][1]
        bests.update(json.dumps([settings, record["val_accuracy"], record["val_loss"]])
                     for _, (settings, record), *_ in rows)
        head = ", ".join(f"{key}={value:g}" for key, value in settings.items())
        print(f"{labels[name]:<40}{wall[name]:>9.1f}{wall['A'] / wall[name]:>6.2f}x  "
              f"{head:<34}{record['val_accuracy']:>9.4f}{record['val_loss']:>10.4f}")
    sweep_phase1 = statistics.median(row[2] for row in rounds["C"])
    single = statistics.median(single_phase1)
    print(f"phase 1 of the 9-head sweep {sweep_phase1:.1f}s against {single:.1f}s for a "
          f"single-head job's (median of A's): {sweep_phase1 / single:.2f}x (goal: at most "
          "1.5x); phase 1 includes the backbone pass")
    print("same best head and accuracy in A, B and C, every round: "
          f"{'yes' if len(bests) == 1 else 'NO: ' + ' | '.join(sorted(bests))}")


if __name__ == "__main__":
    main()
