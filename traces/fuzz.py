"""Mutation fuzzing of input files: byte-level mutants, and a harness that reads trace mutants with a time
limit.

`mutate` makes one mutant of any file (bit flips, a truncation, a zeroed or duplicated range); the importers'
fuzz test uses it as is. `mutate_trace` adds the mutations that target a trace's structure: two swapped ranges
(fields, blocks) and a huge declared size. `fuzz_traces` writes a small valid trace, reads `cases` seeded
mutants of it in a worker process (restarted after a hang or a crash) and sorts each into an Outcome:

    clean    the read returns the original content and metadata
    partial  the read reports the file partial (its writer did not finish) and returns a prefix of the rows
    error    a one-line InputError
    silent   the read succeeds with other content: corruption read as valid
    traceback, crash, hang   any other exception, a dead worker, no answer within the time limit
"""

from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OUTCOMES = ("clean", "partial", "error", "silent", "traceback", "crash", "hang")
BAD_OUTCOMES = ("silent", "traceback", "crash", "hang")
SUFFIXES = {"hdf5": ".h5", "arrow": ".arrow"}
CASE_SECONDS = 15.0  # per-case limit of the harness; the reader's own probe limit is set well below it
PROBE_SECONDS = 3.0


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """One random mutant: 1-8 bit flips, a truncation, or a zeroed or duplicated range of up to 64 bytes."""
    data = bytearray(raw)
    kind = rng.choice(["flip", "truncate", "zero", "duplicate"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            j = rng.randrange(len(data))
            data[j] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[:rng.randrange(len(data))]
    else:
        a = rng.randrange(len(data))
        b = min(len(data), a + rng.randint(1, 64))
        if kind == "zero":
            data[a:b] = bytes(b - a)
        else:
            data[b:b] = data[a:b]
    return bytes(data)


def mutate_trace(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    """(kind, mutant): `mutate`'s kinds, or two swapped ranges, or an 8-byte size field made huge."""
    kind = rng.choice(["byte", "byte", "swap", "huge"])
    data = bytearray(raw)
    if kind == "swap":  # equal-length ranges: a field or a block moved, the file's length unchanged
        size = rng.choice([1, 2, 4, 8, 16, 64, 512, 4096])
        a, b = sorted(rng.sample(range(max(2, len(data) - size)), 2))
        if b - a >= size:
            data[a:a + size], data[b:b + size] = data[b:b + size], data[a:a + size]
        return kind, bytes(data)
    if kind == "huge":  # a small little-endian count or length (likely a declared size) becomes enormous
        words = np.frombuffer(bytes(data[:len(data) - len(data) % 8]), dtype="<u8")
        small = np.flatnonzero((words > 0) & (words < 1 << 32))
        if small.size:
            j = int(small[rng.randrange(small.size)]) * 8
            data[j:j + 8] = int(rng.choice([1 << 40, 1 << 47, (1 << 62) + 7,
                                            (1 << 64) - 1])).to_bytes(8, "little")
        return kind, bytes(data)
    return kind, mutate(raw, rng)


def write_original(path: Path) -> None:
    """A small valid trace of several blocks: 10,000 Mixtral-shaped tokens with weights, appended 3,000 at a
    time (Arrow: 4 record batches; HDF5: one full checksum block and a partly filled one)."""
    from traces.synthetic import SynthConfig, synthesize
    from traces.writer import open_writer

    meta, chunk = synthesize(SynthConfig(model="mixtral-8x7b", tokens=10_000, seed=1))
    with open_writer(path, meta, force=True) as writer:
        for start in range(0, chunk.num_tokens, 3000):
            writer.append(chunk.slice(start, start + 3000))


def read_case(path: Path, original: dict) -> tuple[str, str]:
    """Read a mutant as any command would; (outcome, detail)."""
    from traces.errors import InputError
    from traces.reader import open_trace

    try:
        with open_trace(path) as trace:
            meta = trace.metadata.to_dict()
            status = meta.pop("status")
            chunk = trace.read_all()
    except InputError as exc:
        text = str(exc)
        return ("error" if "\n" not in text else "traceback"), text
    except Exception as exc:  # noqa: BLE001 - the point is to catch what the reader let through
        return "traceback", f"{type(exc).__name__}: {exc}"
    want_meta = dict(original["metadata"])
    want_meta.pop("status")
    if meta != want_meta:
        return "silent", "metadata differs"
    rows = chunk.num_tokens
    same = all(np.array_equal(value, original["columns"][name][:rows])
               for name, value in chunk.present().items())
    if not same:
        return "silent", f"content differs ({rows} rows)"
    if rows == original["rows"] and status == "complete":
        return "clean", ""
    if status == "partial":
        return "partial", f"{rows} of {original['rows']} rows"
    return "silent", f"{rows} of {original['rows']} rows, reported complete"


def _worker(original_path: str, folder: str, first: int, count: int) -> None:
    """Read mutants first..count-1 of `folder`, printing one JSON line per case."""
    from traces.reader import open_trace

    with open_trace(original_path) as trace:
        chunk = trace.read_all()
        original = {"metadata": trace.metadata.to_dict(), "columns": chunk.present(),
                    "rows": chunk.num_tokens}
    suffix = Path(original_path).suffix
    for case in range(first, count):
        outcome, detail = read_case(Path(folder) / f"{case}{suffix}", original)
        print(json.dumps({"case": case, "outcome": outcome, "detail": detail[:300]}), flush=True)


@dataclass
class FuzzResult:
    encoding: str
    cases: int
    counts: Counter = field(default_factory=Counter)
    bad: list[dict] = field(default_factory=list)  # cases with a bad outcome: case, kind, outcome, detail
    errors: list[str] = field(default_factory=list)  # paths of a few mutants that gave one-line errors
    seconds: float = 0.0
    kinds: dict[int, str] = field(default_factory=dict)


def fuzz_traces(encoding: str, cases: int, seed: int, folder: Path, keep_errors: int = 5,
                case_seconds: float = CASE_SECONDS) -> FuzzResult:
    """Write the original trace in `folder`, make `cases` seeded mutants of it, and read each in a worker
    process."""
    suffix = SUFFIXES[encoding]
    original = folder / f"original{suffix}"
    write_original(original)
    raw = original.read_bytes()
    rng = random.Random(f"{seed}-{encoding}")
    mutants = folder / f"mutants-{encoding}"
    mutants.mkdir(exist_ok=True)
    result = FuzzResult(encoding, cases)
    for case in range(cases):
        kind, data = mutate_trace(raw, rng)
        result.kinds[case] = kind
        (mutants / f"{case}{suffix}").write_bytes(data)
    start = time.perf_counter()
    case = 0
    while case < cases:
        case = _run_worker(original, mutants, case, cases, case_seconds, result, keep_errors)
    result.seconds = time.perf_counter() - start
    return result


def _run_worker(original: Path, mutants: Path, first: int, cases: int, case_seconds: float,
                result: FuzzResult, keep_errors: int) -> int:
    """Run one worker from case `first`; return the next case to run after it ends, hangs or dies."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               MOE_TRACE_PROBE_SECONDS=str(PROBE_SECONDS))
    code = f"from traces.fuzz import _worker; _worker({str(original)!r}, {str(mutants)!r}, {first}, {cases})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env)
    assert proc.stdout is not None
    case, buffer = first, b""
    deadline = time.monotonic() + case_seconds + 30  # the first case also pays for the worker's imports
    try:
        while case < cases:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                _record(result, case, "hang", f"no answer in {case_seconds:g} s", keep_errors, mutants)
                return case + 1
            data = os.read(proc.stdout.fileno(), 1 << 16)
            if not data:
                proc.wait()
                _record(result, case, "crash", f"worker exited with {proc.returncode}", keep_errors, mutants)
                return case + 1
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                got = json.loads(line)
                _record(result, got["case"], got["outcome"], got["detail"], keep_errors, mutants)
                case = got["case"] + 1
                deadline = time.monotonic() + case_seconds
        return case
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def _record(result: FuzzResult, case: int, outcome: str, detail: str, keep_errors: int,
            mutants: Path) -> None:
    result.counts[outcome] += 1
    if outcome in BAD_OUTCOMES:
        result.bad.append({"case": case, "kind": result.kinds.get(case), "outcome": outcome,
                           "detail": detail})
    elif outcome == "error" and len(result.errors) < keep_errors:
        result.errors.append(str(mutants / f"{case}{SUFFIXES[result.encoding]}"))


def run(encodings: list[str], cases: int, seed: int) -> list[FuzzResult]:
    """fuzz_traces for each encoding in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        return [fuzz_traces(e, cases, seed, Path(tmp)) for e in encodings]
