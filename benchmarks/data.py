"""`plait prepare` against a plain nanoGPT-style reference, and the start on a prepared corpus.

    .venv/bin/python benchmarks/data.py            # corpora of ~50 MB, 200 MB and 1 GB (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/data.py --quick    # one ~5 MB corpus: checks the script works
    .venv/bin/python benchmarks/data.py --sizes 20 --workdir /tmp/bench --keep

The corpora are made here and not shipped: the `.py`, `.txt`, `.rst` and `.md` files of
this Python's library folder (code, with its docstrings and comments, and some prose), in
sorted order, stitched into text files of about 64 KB (one document each), cycled until the
corpus has the size asked (each pass's files are numbered, so no two files are equal).

For each corpus, each in its own process, measured from outside (wall time, interpreter
start and imports included; peak resident memory of the largest process, forked workers
included, from the kernel's rusage):
- plait: `python -m plait prepare --data CORPUS --out DIR` with the default trained BPE
  (2048 tokens, trained on the first --bpe-sample-mb of text) on every core; its time with and
  without the BPE training (the manifest records how long the tokenizer took);
- reference: what nanoGPT's prepare.py does, with the same tokenizer (plait's trained BPE
  loaded from DIR): read the files, `encode_batch` them in batches, append the ids to one
  file, open it as one np.memmap; no training, so compare it with plait's time less training;
- start: a fresh process doing what `plait train --data DIR` does with the data before its
  first step (`plait.train._prepare_data`: manifest, tokenizer, memory-mapped splits, as rank 0
  opens them) and drawing that step's batch; the same for `plait train --data CORPUS` on a warm
  cache (the corpus's fingerprint first). The imports (torch's, which training needs) are
  timed apart and printed beside it: they cost the same whatever the corpus.
Below the table, the issue's targets with PASS / MISS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
FILE_BYTES = 64 * 1024
SUFFIXES = (".py", ".txt", ".rst", ".md")
TARGETS = {"prep_mb_s": 3.0, "peak_rss_mb": 400.0, "start_s": 1.0}


def library_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted((p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()), key=lambda p: str(p))


def make_corpus(folder: Path, size_mb: float) -> tuple[int, int]:
    """Write ~size_mb MB of text files into `folder` (kept for reuse); returns (files, bytes)."""
    marker = folder / ".complete"
    if marker.exists():
        files, total = json.loads(marker.read_text())
        return files, total
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources, target = library_files(), int(size_mb * 1e6)
    total = count = 0
    buf: list[bytes] = []
    held = 0
    cycle = 0
    while total < target:
        for src in sources:
            try:
                text = src.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            buf.append(f"# {src.name} (pass {cycle})\n{text}\n".encode())
            held += len(buf[-1])
            if held >= FILE_BYTES:
                data = b"".join(buf)
                (folder / f"{count // 1000:04d}").mkdir(exist_ok=True)
                (folder / f"{count // 1000:04d}" / f"doc-{count:06d}.txt").write_bytes(data)
                total += len(data)
                count += 1
                buf, held = [], 0
                if total >= target:
                    break
        cycle += 1
    marker.write_text(json.dumps([count, total]))
    return count, total


# Runs a command and prints the largest peak resident set of it and every process it waited
# for (its forked workers): RUSAGE_CHILDREN's ru_maxrss is the maximum over reaped descendants.
MEASURE = r'''
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], "w"))
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
sys.exit(code)
'''


def run_measured(cmd: list[str], work: Path) -> tuple[float, float, str]:
    """Run `cmd`: (wall seconds, the peak RSS in MB of its largest process, workers included, its stdout)."""
    out = work / "stdout.txt"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(out), *cmd], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, float(proc.stdout.split()[-1]), out.read_text()


REFERENCE = r'''
import json, sys, time
from pathlib import Path
import numpy as np
from tokenizers import Tokenizer
corpus, prepared, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
tok = Tokenizer.from_str(json.dumps(json.loads((prepared / "tokenizer.json").read_text())["huggingface"]))
eot = tok.token_to_id("<|endoftext|>")
files = sorted((p for p in corpus.rglob("*.txt")), key=lambda p: p.relative_to(corpus).as_posix())
n = 0
with open(out, "wb") as f:
    for i in range(0, len(files), 64):
        # The bytes as they are: read_text would turn CRLF line endings into LF (the corpus
        # has some), and the text, and so the tokens, would not be the corpus's.
        texts = [p.read_bytes().decode("utf-8") for p in files[i:i + 64]]
        for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
            ids = np.array(enc.ids + [eot], dtype=np.uint16)
            f.write(ids.tobytes())
            n += len(ids)
tokens = np.memmap(out, dtype=np.uint16, mode="r")
assert len(tokens) == n
print(n)
'''

# The start: what `plait train --data ...` does with the data before its first step, in a fresh
# process: `_prepare_data` (rank 0's share, the larger: the cache check for a raw corpus, then the
# manifest, tokenizer and memory-mapped shards, opened twice as rank 0 does) and the first step's
# batch. The imports (torch's among them) are timed apart: they are the same at every corpus size.
START = r'''
import gc, sys, time
t0 = time.perf_counter()
import numpy.random  # imported by the first batch's draw: an import like the others, timed with them
from plait.config_file import load_config
from plait.data import get_batch
from plait.train import _prepare_data
# The full collection that torch's import has made due: it comes at the first allocations
# after it, whatever they are (the tokenizer's JSON here, 0.2 s), and belongs to the import.
gc.collect()
t1 = time.perf_counter()
overrides = {"data.data": sys.argv[1], "data.data_dir": sys.argv[2]}
if sys.argv[3:]:
    overrides["data.bpe_sample_mb"] = sys.argv[3]
cfg = load_config(None, overrides)
data = _prepare_data(cfg)
x, y = get_batch(data.train, cfg.train.seed, 0, cfg.train.global_batch, cfg.seq_len)
t2 = time.perf_counter()
print(t2 - t1, t1 - t0, len(data.train) + len(data.val))
'''


def bench(corpus: Path, work: Path, size_mb: float, bpe_sample_mb: float | None) -> dict:
    files, nbytes = make_corpus(corpus, size_mb)
    out = work / f"prepared-{corpus.name}"
    shutil.rmtree(out, ignore_errors=True)
    py = sys.executable
    extra = ["--bpe-sample-mb", str(bpe_sample_mb)] if bpe_sample_mb else []
    wall, rss, _ = run_measured([py, "-m", "plait", "prepare", "--data", str(corpus), "--out", str(out),
                                 "--no-progress", *extra], work)
    manifest = json.loads((out / "manifest.json").read_text())
    ref_out = work / f"reference-{corpus.name}.bin"
    ref_wall, ref_rss, ref_stdout = run_measured([py, "-c", REFERENCE, str(corpus), str(out), str(ref_out)], work)
    ref_tokens = int(ref_stdout.split()[0])
    ref_out.unlink()
    # The start: a prepared folder, then the raw corpus on a warm cache (a cache holding it).
    cache = work / f"cache-{corpus.name}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    import importlib

    sys.path.insert(0, str(SRC))
    corpus_mod = importlib.import_module("plait.data.corpus")
    opts = corpus_mod._options("bpe", 2048, 0.1, **({"bpe_sample_mb": bpe_sample_mb} if bpe_sample_mb else {}))
    key = corpus_mod._plan(str(corpus), opts)[3]
    os.symlink(out.resolve(), cache / key)  # the cache entry `plait train --data CORPUS` looks for
    starts = {}
    for name, data in (("folder", str(out)), ("raw", str(corpus))):
        sample = [str(bpe_sample_mb)] if bpe_sample_mb else []
        _, start_rss, line = run_measured([py, "-c", START, data, str(cache), *sample], work)
        seconds, import_s, tokens = line.split()
        assert int(tokens) == manifest["tokens"], (name, tokens, manifest["tokens"])
        starts[name] = (float(seconds), start_rss, float(import_s))
    shutil.rmtree(cache)
    return {
        "corpus": corpus.name, "files": files, "mb": nbytes / 1e6, "tokens": manifest["tokens"],
        "plait_s": wall, "train_bpe_s": manifest.get("tokenizer_seconds", 0.0), "plait_rss": rss,
        "encode_s": manifest.get("encode_seconds", 0.0),
        "ref_s": ref_wall, "ref_rss": ref_rss, "ref_tokens": ref_tokens,
        "start_folder_s": starts["folder"][0], "start_raw_s": starts["raw"][0],
        "start_rss": max(starts["folder"][1], starts["raw"][1]), "start_import_s": starts["folder"][2],
    }


def table(rows: list[dict]) -> str:
    head = (f"{'corpus':>8} {'files':>6} {'MB':>7} {'tokens':>12} | {'plait s':>8} {'MB/s':>6} {'tok/s':>10} "
            f"{'(BPE s)':>8} {'RSS MB':>7} | {'ref s':>7} {'MB/s':>6} {'RSS MB':>7} | {'start dir s':>11} "
            f"{'start raw s':>11} {'RSS MB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['corpus']:>8} {r['files']:>6} {r['mb']:>7.1f} {r['tokens']:>12,} | {r['plait_s']:>8.1f} "
            f"{r['mb'] / r['plait_s']:>6.2f} {r['tokens'] / r['plait_s']:>10,.0f} {r['train_bpe_s']:>8.1f} "
            f"{r['plait_rss']:>7.0f} | {r['ref_s']:>7.1f} {r['mb'] / r['ref_s']:>6.2f} {r['ref_rss']:>7.0f} | "
            f"{r['start_folder_s']:>11.3f} {r['start_raw_s']:>11.3f} {r['start_rss']:>7.0f}")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        mb_s = r["mb"] / r["plait_s"]
        checks = [
            (f"prep >= {TARGETS['prep_mb_s']:g} MB/s", f"{mb_s:.2f} MB/s", mb_s >= TARGETS["prep_mb_s"]),
            (f"peak RSS <= {TARGETS['peak_rss_mb']:g} MB", f"{r['plait_rss']:.0f} MB",
             r["plait_rss"] <= TARGETS["peak_rss_mb"]),
            (f"start <= {TARGETS['start_s']:g} s", f"{r['start_folder_s']:.3f} s (folder), "
             f"{r['start_raw_s']:.3f} s (raw, warm cache); the imports {r['start_import_s']:.1f} s before either",
             max(r["start_folder_s"], r["start_raw_s"]) <= TARGETS["start_s"]),
            ("no slower than the reference", f"{r['plait_s'] - r['train_bpe_s']:.1f} s ({r['encode_s']:.1f} s "
             f"encoding, the rest start and imports) + {r['train_bpe_s']:.1f} s BPE training vs {r['ref_s']:.1f} s",
             r["plait_s"] - r["train_bpe_s"] <= r["ref_s"]),
            ("same tokens as the reference", f"{r['tokens']:,} vs {r['ref_tokens']:,}", r["tokens"] == r["ref_tokens"]),
        ]
        for what, figures, ok in checks:
            out.append(f"{r['corpus']:>8}  {what:<32} {figures:<84} {'PASS' if ok else 'MISS'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one ~5 MB corpus")
    parser.add_argument("--sizes", type=float, nargs="+", metavar="MB", help="corpus sizes (default: 50 200 1000)")
    parser.add_argument("--bpe-sample-mb", type=float, help="passed to plait prepare (default: plait's)")
    parser.add_argument("--workdir", help="where corpora and outputs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (corpora are reused)")
    args = parser.parse_args()
    sizes = args.sizes or ([5] if args.quick else [50, 200, 1000])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="plait-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; work folder {work}")
    rows = []
    try:
        for size in sizes:
            rows.append(bench(work / f"{size:g}MB", work, size, args.bpe_sample_mb))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        print()
        print(table(rows))
        print()
        print("\n".join(verdicts(rows)))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
