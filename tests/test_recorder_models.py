"""Where --model loads from, decided before transformers tries: folders, the hub cache, and the hub's answers.

The hub is never reached: HF_ENDPOINT points at a closed port (no network) or at a local server that answers
like the hub does for a missing repository, and HF_HUB_CACHE at a folder the test fills.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from recorder.builtin_models import build_builtin_model, build_builtin_tokenizer
from recorder.models import looks_like_path, resolve_model_source
from traces import InputError, open_trace

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "prompts.txt"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def moe_rec(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # the case decides offline mode
    inherited = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    full_env = {**inherited, "PYTHONPATH": str(ROOT), **env}
    code = "import sys, cli; sys.argv[0] = 'moe-rec'; cli.moe_rec()"
    return subprocess.run([sys.executable, "-c", code, "record", *args], cwd=ROOT, capture_output=True,
                          text=True, env=full_env, timeout=600)


def closed_port() -> int:
    """A loopback port nobody listens on: a connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def missing_repo_hub() -> Iterator[str]:
    """A local endpoint answering every request as the hub answers for a repository that does not exist."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_folders_are_told_apart_from_hub_ids(tmp_path: Path) -> None:
    assert not looks_like_path("allenai/OLMoE-1B-7B-0924") and not looks_like_path("gpt2")
    assert all(looks_like_path(p) for p in ("./nosuchdir", "/abs/model", "~/m", "a/b/c", "..\\win"))
    with pytest.raises(InputError, match="^--model ./nosuchdir: no such directory$"):
        resolve_model_source("./nosuchdir")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        resolve_model_source(str(tmp_path / "file.txt"))
    with pytest.raises(InputError, match="no config.json"):
        resolve_model_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    source = resolve_model_source(str(tmp_path))
    assert (source.kind, source.local_files_only) == ("folder", True)


def test_cli_errors_are_one_line_and_tell_the_causes_apart(tmp_path: Path, missing_repo_hub: str) -> None:
    cache = str(tmp_path / "empty-cache")
    no_network = {"HF_HUB_CACHE": cache, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    cases = [
        ("./nosuchdir", no_network, "no such directory"),
        ("acme/not-cached", no_network, "cannot reach the Hugging Face hub"),
        ("acme/not-cached", {**no_network, "HF_HUB_OFFLINE": "1"}, "not in the local cache"),
        ("acme/no-such-model", {"HF_HUB_CACHE": cache, "HF_ENDPOINT": missing_repo_hub},
         "no such model on the Hugging Face hub"),
    ]
    for model, env, message in cases:
        out = moe_rec("--prompts", str(PROMPTS), "--model", model, "-o", str(tmp_path / "t.h5"), env=env)
        assert out.returncode == 2, (model, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert (len(lines) == 1 and lines[0].startswith(f"error: --model {model}: ")
                and message in lines[0]), lines
        assert not (tmp_path / "t.h5").exists()
    # the offline error names the cause, the unreachable one does not claim the model is missing
    offline = moe_rec("--prompts", str(PROMPTS), "--model", "acme/x", "-o", str(tmp_path / "t.h5"),
                      env={**no_network, "HF_HUB_OFFLINE": "1"})
    assert "HF_HUB_OFFLINE is set" in offline.stderr and "no such model" not in offline.stderr


def test_a_cached_hub_model_records_with_no_network(tmp_path: Path) -> None:
    """A hub id in the local cache loads from it without asking the (unreachable) hub, and records the routing
    of the same weights as the built-in model they were saved from."""
    repo = tmp_path / "hub" / "models--acme--tiny-moe"
    snapshot = repo / "snapshots" / COMMIT
    build_builtin_model("olmoe-tiny", torch.device("cpu"), torch.float32).save_pretrained(snapshot)
    build_builtin_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    args = ("--prompts", str(PROMPTS), "--max-new-tokens", "3", "--device", "cpu", "--dtype", "fp32")
    cached = moe_rec(*args, "--model", "acme/tiny-moe", "-o", str(tmp_path / "hub.h5"), env=env)
    assert cached.returncode == 0, cached.stderr
    builtin = moe_rec(*args, "--model", "olmoe-tiny", "-o", str(tmp_path / "builtin.h5"), env=env)
    assert builtin.returncode == 0, builtin.stderr
    with open_trace(tmp_path / "hub.h5") as a, open_trace(tmp_path / "builtin.h5") as b:
        assert a.metadata.model_id == "acme/tiny-moe" and a.num_tokens == b.num_tokens > 0
        np.testing.assert_array_equal(a.read_all().expert_ids, b.read_all().expert_ids)
