"""record(): run a model over a prompts file (prefill, then optional greedy decode) and write its routing
trace.

Crash safety: the trace is written under `<output>.partial` one whole prompt batch at a time and renamed only
when the run completes. Ctrl-C, SIGTERM, a bad prompt or an error leave the `.partial` file with every
completed batch; `--resume` reads which prompts it holds and continues with the rest. On CUDA out-of-memory a
batch is split in two and retried, and later batches keep the smaller size.
"""

from __future__ import annotations

import inspect
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from recorder.blocks import HostBlock
from recorder.capture import PassTokens, RoutingCapture
from recorder.config import RecordConfig
from recorder.metadata import build_metadata
from recorder.models import load_model, resolve_device, resolve_dtype
from recorder.prompts import PromptSet, load_prompts, render
from recorder.ranks import RankInfo, rank_prompts, shard_path
from recorder.routers import discover_routers
from recorder.sink import TraceSink
from traces.errors import InputError
from traces.reader import open_trace
from traces.schema import PHASE_DECODE, PHASE_PREFILL, TraceMetadata
from traces.writer import encoding_for, open_writer, partial_path

EOS_CHECK_EVERY = 16  # decode steps between the (synchronising) "all sequences finished?" checks
WINDOW_PASSES = 64  # passes per device->host copy (see recorder/capture.py)


@dataclass
class RecordResult:
    path: Path
    complete: bool
    tokens: int  # recorded by this run
    sequences: int  # recorded by this run
    total_tokens: int  # in the file, earlier runs of a resumed trace included
    seconds: float
    truncated: int
    blank_lines: int
    oom_splits: int
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def forward_kwargs(model: Any) -> tuple[str, bool]:
    """(name of the KV-cache argument, whether `logits_to_keep` exists) for this transformers version."""
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, "logits_to_keep" in params


def output_cache(out: Any) -> Any:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


@dataclass
class ResumeState:
    done: set[int]
    next_step: int
    tokens: int


def read_resume_state(partial: Path, meta: TraceMetadata) -> ResumeState:
    """Which prompts an interrupted trace already holds; InputError if it was recorded differently."""
    with open_trace(partial) as trace:
        old = trace.metadata
        if old.prompts_sha256 != meta.prompts_sha256:
            raise InputError(f"{partial}: was recorded from a different prompts file; cannot --resume it")
        mine, theirs = meta.contract(), old.contract()
        diff = sorted(k for k in mine if k not in ("created_at",) and mine.get(k) != theirs.get(k))
        if diff:
            raise InputError(f"{partial}: was recorded with other settings ({', '.join(diff[:4])}); cannot "
                             "--resume")
        done: set[int] = set()
        last_step = -1
        for chunk in trace.iter_chunks(("seq_id", "step")):
            assert chunk.seq_id is not None and chunk.step is not None
            done.update(np.unique(chunk.seq_id).tolist())
            if chunk.num_tokens:
                last_step = max(last_step, int(chunk.step.max()))
        return ResumeState(done, last_step + 1, trace.num_tokens)


class BatchRunner:
    """Runs one batch of prompts (prefill + greedy decode) and returns its passes, splitting on CUDA OOM."""

    def __init__(self, model: Any, tokenizer: Any, capture: RoutingCapture, prompts: PromptSet,
                 cfg: RecordConfig, device: torch.device, console: Console, first_step: int = 0,
                 step_stride: int = 1):
        self.model, self.tokenizer, self.capture = model, tokenizer, capture
        self.prompts, self.cfg, self.device, self.console = prompts, cfg, device, console
        self.step = first_step
        self.step_stride = step_stride  # world_size under torchrun: ranks number their passes apart
        self.batch_limit = cfg.batch_size
        self.truncated = 0
        self.oom_splits = 0
        self.cache_arg, self.has_logits_to_keep = forward_kwargs(model)
        self.pad_id = int(tokenizer.pad_token_id)
        eos = tokenizer.eos_token_id
        self.eos_id = int(eos) if isinstance(eos, int) else None

    def encode(self, seq_ids: list[int]) -> list[list[int]]:
        rows = []
        for i in seq_ids:
            prompt = self.prompts.prompts[i]
            text, special = render(prompt, self.tokenizer, self.prompts.path)
            ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
            if not ids:
                raise InputError(f"{self.prompts.path}:{prompt.line}: prompt is empty after tokenization")
            if len(ids) > self.cfg.max_length:
                self.truncated += 1
                ids = ids[: self.cfg.max_length]
            rows.append(ids)
        return rows

    def run(self, seq_ids: list[int]) -> list[tuple[list[HostBlock], int]]:
        """[(blocks of a sub-batch, its number of prompts)]: one entry, or several after out-of-memory
        splits."""
        start_step, truncated = self.step, self.truncated
        try:
            return [(self._run(seq_ids), len(seq_ids))]
        except torch.OutOfMemoryError:
            # handled below, out of the except block, so the traceback's tensors are freed before retrying
            pass
        self.capture.clear()
        self.step, self.truncated = start_step, truncated
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(seq_ids) == 1:
            line = self.prompts.prompts[seq_ids[0]].line
            raise InputError(
                f"{self.prompts.path}:{line}: out of memory on this prompt alone; lower --max-length or "
                "--max-new-tokens, or use a smaller --dtype"
            )
        half = len(seq_ids) // 2
        self.batch_limit = max(1, min(self.batch_limit, half))
        self.oom_splits += 1
        self.console.print(
            f"[yellow]warning:[/] out of memory at batch size {len(seq_ids)}; splitting into {half} + "
            f"{len(seq_ids) - half} and retrying (later batches use at most {self.batch_limit})"
        )
        return self.run(seq_ids[:half]) + self.run(seq_ids[half:])

    def _forward(self, **kwargs: Any) -> Any:
        if self.has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs)

    @torch.inference_mode()
    def _run(self, seq_ids: list[int]) -> list[HostBlock]:
        rows = self.encode(seq_ids)
        b, s = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((b, s), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, s), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: the last token of every row is at column s - 1
            input_ids[i, s - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, s - len(r):] = 1
        lengths = mask.sum(1)
        position = (mask.cumsum(1) - 1).clamp(min=0)
        seq = np.asarray(seq_ids, dtype=np.int64)
        new_tokens = self.cfg.max_new_tokens
        dev = self.device
        mask_dev, ids_dev, position_dev = mask.to(dev), input_ids.to(dev), position.to(dev)
        self.capture.clear()
        out = self._forward(input_ids=ids_dev, attention_mask=mask_dev, position_ids=position_dev,
                            use_cache=new_tokens > 0)
        # Passes are filed into the capture's window; a block's copy to the host starts when a window fills,
        # the pass shape changes (prefill -> decode) or the batch ends, so a batch's blocks hold exactly its
        # passes.
        blocks = self.capture.end_pass(PassTokens(seq, position_dev, ids_dev, mask_dev, PHASE_PREFILL,
                                                  self.step))
        self.step += self.step_stride
        if new_tokens == 0:
            return blocks + self.capture.collect()
        cache = output_cache(out)
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        next_ids = out.logits[:, -1].argmax(-1)
        lengths_dev = lengths.to(dev)
        for j in range(new_tokens):
            mask_dev = torch.cat([mask_dev, torch.ones((b, 1), dtype=mask_dev.dtype, device=dev)], dim=1)
            pos = (lengths_dev + j)[:, None]
            out = self._forward(input_ids=next_ids[:, None], attention_mask=mask_dev, position_ids=pos,
                                use_cache=True, **{self.cache_arg: cache})
            tokens = PassTokens(seq, pos, next_ids[:, None], ~finished[:, None], PHASE_DECODE, self.step)
            blocks += self.capture.end_pass(tokens)
            self.step += self.step_stride
            if self.eos_id is not None:
                finished = finished | (next_ids == self.eos_id)
                if j % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 and bool(finished.all()):
                    break
            cache = output_cache(out)
            next_ids = out.logits[:, -1].argmax(-1)
        return blocks + self.capture.collect()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread, so it leaves the same partial trace as Ctrl-C."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]recording"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("prompts"),
        TextColumn("{task.fields[tokens]:,} tokens"),
        TextColumn("{task.fields[rate]:,.0f} tok/s"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )


def record(cfg: RecordConfig, console: Console | None = None) -> RecordResult:
    """Record the routing of cfg.model over cfg.prompts into cfg.output. See the module docstring for
    safety."""
    console = console or Console(stderr=True)
    ranks = RankInfo(cfg.rank, cfg.world_size, cfg.local_rank)
    if not 0 <= ranks.rank < ranks.world_size:
        raise InputError(f"rank {ranks.rank} is not in 0..{ranks.world_size - 1}")
    out = shard_path(Path(cfg.output), ranks.rank) if ranks.distributed else Path(cfg.output)
    encoding_for(out)  # unsupported extension: fail before loading anything
    partial = partial_path(out)
    if out.exists() and not cfg.force:
        raise InputError(f"{out}: already exists (pass --force to overwrite)")
    if partial.exists() and not (cfg.resume or cfg.force):
        raise InputError(f"{partial}: an interrupted trace is here (pass --resume to continue it or --force "
                         "to start over)")
    if cfg.batch_size < 1 or cfg.max_length < 1 or cfg.max_new_tokens < 0:
        raise InputError("--batch-size and --max-length must be at least 1, --max-new-tokens at least 0")
    prompts = load_prompts(cfg.prompts, cfg.prompt_field)
    device = resolve_device(f"cuda:{ranks.local_rank}" if ranks.distributed and cfg.device == "auto"
                            and torch.cuda.is_available() else cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cfg.model)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model, tokenizer = load_model(cfg.model, device, dtype, revision=cfg.revision,
                                  trust_remote_code=cfg.trust_remote_code)
    layout = discover_routers(model)
    meta = build_metadata(
        model, layout, model_id=cfg.model, revision=cfg.revision, token_ids=cfg.token_ids,
        save_logits=cfg.save_logits, prompts_sha256=prompts.sha256, command_line=cfg.command_line,
        notes={"decoding": "greedy", "max_length": cfg.max_length, "max_new_tokens": cfg.max_new_tokens,
               **({"rank": ranks.rank, "world_size": ranks.world_size} if ranks.distributed else {})},
    )
    resume = ResumeState(set(), 0, 0)
    if cfg.resume and partial.exists() and not cfg.force:
        resume = read_resume_state(partial, meta)
    mine = rank_prompts(len(prompts.prompts), ranks)
    todo = [i for i in mine if i not in resume.done]
    # steps: rank r numbers its passes r, r + N, r + 2N, ... (N ranks), so passes of all shards stay distinct
    first_step = resume.next_step - 1 + ranks.world_size if resume.tokens else ranks.rank
    writer = open_writer(out, meta, force=cfg.force, resume=cfg.resume and not cfg.force)
    capture = RoutingCapture(layout, save_logits=cfg.save_logits, window_passes=WINDOW_PASSES,
                             copy_in_writer=True)
    runner = BatchRunner(model, tokenizer, capture, prompts, cfg, device, console, first_step=first_step,
                         step_stride=ranks.world_size)
    progress = _progress(console, cfg.progress)
    task = progress.add_task("record", total=len(todo), tokens=0, rate=0.0)
    started = time.perf_counter()

    def on_written(sequences: int, tokens: int) -> None:
        done_tokens = sink.tokens_written
        rate = done_tokens / max(time.perf_counter() - started, 1e-9)
        progress.update(task, advance=sequences, tokens=done_tokens, rate=rate)

    sink = TraceSink(writer, with_token_ids=cfg.token_ids, id_dtype=meta.id_dtype,
                     weights_dtype=np.dtype(meta.weights_dtype), on_written=on_written)
    complete = False
    sequences = 0
    try:
        with sigterm_as_interrupt(), progress:
            pos = 0
            while pos < len(todo):
                batch = todo[pos: pos + runner.batch_limit]
                pos += len(batch)
                for blocks, n in runner.run(batch):
                    sink.submit(blocks, n)
                    sequences += n
            sink.close()
        complete = True
    finally:
        capture.remove()
        if not complete:
            try:
                sink.close()  # whole batches already handed over still reach the file
            except Exception as exc:  # the original error matters more; say what was lost
                console.print(f"[red]error while saving the partial trace:[/] {exc}")
        path = writer.close(complete)
        if not complete:
            console.print(
                f"[yellow]stopped:[/] {sink.batches_written} batch(es) of this run saved in {path}; "
                "rerun the same command with --resume to continue"
            )
    seconds = time.perf_counter() - started
    return RecordResult(
        path=path, complete=complete, tokens=sink.tokens_written, sequences=sequences,
        total_tokens=resume.tokens + sink.tokens_written, seconds=seconds, truncated=runner.truncated,
        blank_lines=prompts.blank_lines, oom_splits=runner.oom_splits,
    )


def print_summary(result: RecordResult, max_length: int, console: Console) -> None:
    """The closing summary: tokens, file, size, bytes per token, time."""
    size = result.path.stat().st_size
    if result.truncated:
        console.print(f"[yellow]warning:[/] {result.truncated} prompt(s) longer than --max-length "
                      f"{max_length} were truncated")
    if result.blank_lines:
        console.print(f"skipped {result.blank_lines} blank line(s) in the prompts file")
    per_token = size / result.total_tokens if result.total_tokens else 0.0
    console.print(
        f"recorded {result.tokens:,} tokens from {result.sequences:,} prompts in {result.seconds:.1f} s "
        f"({result.tokens_per_second:,.0f} tokens/s)"
    )
    console.print(f"trace: {result.path}  {size / 2**20:.2f} MiB, {result.total_tokens:,} tokens, "
                  f"{per_token:.1f} bytes/token")
