"""What a job costs as its data grows, measured in one run.

    python scripts/bench_scale.py [--sizes=1000,4000,16000] [--gcs_images=1000] [--workdir=DIR]
                                  [--jobs_from=CHECKOUT]

At each size, on generated photo-like JPEGs (two classes, 2:1 train/validation) with
MobileNetV2 at 96 px, each job a process of its own:
- fresh: start -> first epoch line, images read, peak RSS; stopped by SIGTERM at that line;
- resume: the same command again -> its first epoch line, images read; run to the end;
- feature cache: a job that fills --feature_cache, then another with a new --model_dir that
  finds it: its start -> first epoch, images read;
- stopped mid-pass (largest size only): SIGTERM once the job has read half the images, then
  the same command again: the images the rerun reads, against what the stop left to do;
- prepare: its peak RSS and time.
And at --gcs_images, through the GCS emulator the tests use: a job reading the image folder
from gs://, and one reading trainer.prepare's shards from gs://.

Images read are counted from outside the job, by inotify: every open of an image file.
Stops are triggered by what the job does (a line it prints, a count of its reads), never by
a clock. Lines of the job's own log give the times.

--jobs_from runs the jobs and prepare of another checkout (say, an earlier commit's, for a
before-and-after on the same machine); the data, the emulator and the counting stay this one's.
"""

import argparse
import ctypes
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS_FROM = REPO  # the checkout whose trainer the jobs run (--jobs_from)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

IN_OPEN = 0x20
JOB = ["--backbone=mobilenet_v2", "--image_size=96", "--batch_size=64", "--epochs=2",
       "--fine_tune_epochs=1", "--strategy=cpu", "--export_tflite=false", "--seed=0"]


class Reads:
    """Counts opens of the image files under a folder (inotify on each of its folders)."""

    def __init__(self, root):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK)
        for folder, _, _ in os.walk(root):
            self._libc.inotify_add_watch(self._fd, folder.encode(), IN_OPEN)
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if not ready:
                continue
            buffer = os.read(self._fd, 1 << 16)
            offset = 0
            while offset < len(buffer):
                _, mask, _, length = struct.unpack_from("iIII", buffer, offset)
                name = buffer[offset + 16:offset + 16 + length].rstrip(b"\0")
                offset += 16 + length
                if mask & IN_OPEN and name.lower().endswith((b".jpg", b".jpeg", b".png")):
                    self.count += 1

    def take(self):
        """The count since the last take (after the events in flight are read)."""
        time.sleep(0.5)
        count, self.count = self.count, 0
        return count


def job(flags, stop_when=None, env=None):
    """Runs trainer.task; returns {first_epoch: seconds from its start to its first epoch
    line, rss_mb, wall, code, pause: seconds from the last epoch line to "predicting"}.
    stop_when(line) -> True sends SIGTERM, once."""
    began = time.time()
    process = subprocess.Popen([sys.executable, "-m", "trainer.task", *JOB, *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=JOBS_FROM, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                                  **(env or {})))
    errors = []
    reader = threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)
    reader.start()
    first_epoch, last_epoch, pause, sent = None, None, None, False
    for line in process.stdout:
        if line.startswith("epoch "):
            last_epoch = time.time()
            first_epoch = first_epoch or last_epoch - began
        if line.startswith("predicting") and last_epoch:
            pause = time.time() - last_epoch
        if stop_when and not sent and stop_when(line):
            process.send_signal(signal.SIGTERM)
            sent = True
    _, status, usage = os.wait4(process.pid, 0)
    reader.join()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 42):
        sys.exit(f"job failed ({code}): {' '.join(flags)}\n{''.join(errors)[-3000:]}")
    return {"first_epoch": first_epoch, "rss_mb": usage.ru_maxrss / 1024,
            "wall": time.time() - began, "code": code, "pause": pause}


def at_first_epoch(line):
    return line.startswith("epoch ")


def stopped_mid_pass(flags, reads, images):
    """SIGTERM once the job has read half the images, then the same command again:
    (images read before the stop, images the rerun read)."""
    reads.take()
    process = subprocess.Popen([sys.executable, "-m", "trainer.task", *JOB, *flags,
                                "--overwrite"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=JOBS_FROM, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))

    def stop_at_half():
        while process.poll() is None:
            if reads.count >= images // 2:
                process.send_signal(signal.SIGTERM)
                return
            time.sleep(0.02)

    threading.Thread(target=stop_at_half, daemon=True).start()
    output = process.communicate()[0]
    # 42: stopped, its work kept; -SIGTERM: killed by it (a job that did not handle it).
    if process.returncode not in (42, -signal.SIGTERM):
        sys.exit(f"the job stopped mid-pass exited {process.returncode}:\n{output[-3000:]}")
    before = reads.take()
    job(flags, stop_when=at_first_epoch)
    model_dir = next(flag for flag in flags if flag.startswith("--model_dir="))[12:]
    chunks = [name.rsplit("-", 2) for name in os.listdir(os.path.join(model_dir, "cache"))] \
        if os.path.isdir(os.path.join(model_dir, "cache")) else []
    largest = max((int(end[:-4]) - int(start) for _, start, end in chunks), default=0)
    return before, reads.take(), largest


def prepare(data, output, env=None):
    """(peak RSS MB, seconds) of trainer.prepare."""
    began = time.time()
    process = subprocess.Popen([sys.executable, "-m", "trainer.prepare", f"--images={data}",
                                f"--output={output}", "--overwrite"], cwd=JOBS_FROM,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})))
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        sys.exit(f"prepare failed: {process.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024, time.time() - began


def make_folder(root, images):
    """Photo-like JPEGs of 160x120 (about 20 KB), two classes, 2:1 train/validation."""
    from trainer import demo
    if not os.path.isdir(root):
        demo.write(root, train_per_class=images // 3, validation_per_class=images // 6,
                   size=(160, 120), classes=demo.CLASSES[:2], photos=True)
    return root


def one_size(images, workdir, weights, mid_pass):
    data = make_folder(os.path.join(workdir, f"data_{images}"), images)
    reads = Reads(data)
    common = [f"--data={data}", f"--base_weights={weights}"]
    flags = [*common, f"--model_dir={os.path.join(workdir, f'run_{images}')}"]
    row = {"images": images}
    reads.take()
    fresh = job([*flags, "--overwrite"], stop_when=at_first_epoch)
    row.update(fresh=fresh["first_epoch"], fresh_reads=reads.take(), rss=fresh["rss_mb"])
    resumed = job(flags)
    row.update(resume=resumed["first_epoch"], resume_reads=reads.take(),
               resume_pause=resumed["pause"])
    shared = os.path.join(workdir, f"feature_cache_{images}")
    for name in ("fill", "hit"):
        hit = job([*common, f"--model_dir={os.path.join(workdir, f'{name}_{images}')}",
                   f"--feature_cache={shared}", "--overwrite"], stop_when=at_first_epoch)
        row.update(cache_hit=hit["first_epoch"], cache_hit_reads=reads.take())
    if mid_pass:
        row["mid_pass"] = stopped_mid_pass(
            [*common, f"--model_dir={os.path.join(workdir, f'mid_{images}')}"], reads, images)
    row["prepare_rss"], row["prepare_seconds"] = prepare(
        data, os.path.join(workdir, f"prepared_{images}"))
    return row


def through_gcs(images, workdir, weights):
    """(image folder, prepared shards) from the GCS emulator: start -> first epoch of each."""
    from tests.gcs import Emulator
    data = make_folder(os.path.join(workdir, f"data_{images}"), images)
    emulator = Emulator(tempfile.mkdtemp(dir=workdir))
    try:
        bucket = emulator.bucket("bench")
        folder = emulator.upload_tree(data, f"{bucket}/images")
        shards = f"{bucket}/prepared"
        prepare(folder, shards, emulator.env)
        return [job([f"--data={source}", f"--base_weights={weights}",
                     f"--model_dir={bucket}/run_{name}", "--overwrite"],
                    stop_when=at_first_epoch, env=emulator.env)["first_epoch"]
                for name, source in (("folder", folder), ("shards", shards))]
    finally:
        emulator.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000,16000")
    parser.add_argument("--gcs_images", type=int, default=1000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--jobs_from", default=REPO)
    args = parser.parse_args()
    global JOBS_FROM
    JOBS_FROM = os.path.abspath(args.jobs_from)
    from bench_train import CALIBRATE, timed
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-scale-")
    sizes = [int(size) for size in args.sizes.split(",")]
    weights = os.path.join(workdir, "mobilenet_v2_bn.weights.h5")
    if not os.path.exists(weights):
        data = make_folder(os.path.join(workdir, f"data_{sizes[0]}"), sizes[0])
        timed([sys.executable, "-c", CALIBRATE, data, "96", weights])
    rows = [one_size(size, workdir, weights, size == sizes[-1]) for size in sizes]
    gcs = through_gcs(args.gcs_images, workdir, weights) if args.gcs_images else None
    print(json.dumps({"rows": rows, "gcs": gcs}), file=sys.stderr)
    print(f"MobileNetV2 at 96 px, batch 64, {os.cpu_count()} CPUs; images read counted by "
          "inotify; times in s from the process's start to its first epoch line; pause: the "
          "resumed job's last epoch line to its next")
    print(f"{'images':>7}{'fresh':>8}{'reads':>7}{'resume':>8}{'reads':>7}{'resume/fresh':>13}"
          f"{'cache hit':>10}{'reads':>7}{'job RSS MB':>11}{'prepare RSS MB':>15}"
          f"{'prepare s':>10}{'pause s':>8}")
    for row in rows:
        print(f"{row['images']:>7}{row['fresh']:>8.1f}{row['fresh_reads']:>7}"
              f"{row['resume']:>8.1f}{row['resume_reads']:>7}"
              f"{row['resume'] / row['fresh']:>12.0%} {row['cache_hit']:>9.1f}"
              f"{row['cache_hit_reads']:>7}{row['rss']:>11.0f}{row['prepare_rss']:>15.0f}"
              f"{row['prepare_seconds']:>10.1f}{row['resume_pause']:>8.1f}")
    last = rows[-1]
    before, after, chunk = last["mid_pass"]
    print(f"{last['images']} images, SIGTERM after the job read {before}: the rerun read "
          f"{after}, {after - (last['fresh_reads'] - before):+} against the images the stop left "
          f"unread (chunks of at most {chunk} images)")
    print(f"prepare's peak RSS from {rows[0]['images']} to {last['images']} images: "
          f"{last['prepare_rss'] - rows[0]['prepare_rss']:+.0f} MB")
    if gcs:
        print(f"{args.gcs_images} images through the GCS emulator, start -> first epoch: "
              f"image folder {gcs[0]:.1f}s, prepared shards {gcs[1]:.1f}s")


if __name__ == "__main__":
    main()
