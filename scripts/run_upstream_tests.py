"""Run upstream SGLang's own HTTP server test files, unchanged, against sglab.

    python scripts/run_upstream_tests.py --upstream-dir SGLANG_CHECKOUT [--files F ...] \
        [--out DIR]

The files import `sglang.test.test_utils` (popen_launch_server, the default model names and
URL), `sglang.srt.utils.kill_process_tree` and a few other helpers; a small `sglang` shim
package, written to a temp dir and put first on PYTHONPATH, provides them: its
popen_launch_server starts `python -m sglab.launch_server` on sglab's tiny default model (every
upstream model name stands for it) with the test's own extra flags. Each file runs under
pytest; the summary (per file: passed / failed / errors / skipped, and each failure's first
line) goes to stdout and, with --out, to DIR/upstream-tests.{json,md}.

Not part of CI: it needs an upstream checkout, and most upstream cases expect a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import shutil
import signal
import tempfile
import textwrap
import xml.etree.ElementTree as ET

DEFAULT_FILES = [
    "test/srt/test_srt_endpoint.py",
    "test/srt/test_json_constrained.py",
    "test/srt/test_regex_constrained.py",
    "test/srt/test_ebnf_constrained.py",
    "test/srt/test_abort.py",
    "test/srt/test_score_api.py",
    "test/srt/openai_server/basic/test_openai_server.py",
    "test/srt/openai_server/features/test_json_constrained.py",
    "test/srt/openai_server/features/test_json_mode.py",
    "test/srt/openai_server/features/test_openai_server_ebnf.py",
    "test/srt/openai_server/features/test_structural_tag.py",
    "test/srt/openai_server/validation/test_matched_stop.py",
    "test/srt/openai_server/validation/test_request_length_validation.py",
    "test/srt/openai_server/validation/test_large_max_new_tokens.py",
]

_TEST_UTILS = '''
"""sglab's stand-in for sglang.test.test_utils: the names upstream's server tests import."""
import os
import socket
import subprocess
import sys
import time
import unittest

import requests

from sglab.srt.utils.dummy_model import get_default_model_path

_MODEL = get_default_model_path()
for _name in ("DEFAULT_MODEL_NAME_FOR_TEST", "DEFAULT_SMALL_MODEL_NAME_FOR_TEST",
              "DEFAULT_SMALL_MODEL_NAME_FOR_TEST_QWEN", "DEFAULT_MOE_MODEL_NAME_FOR_TEST",
              "DEFAULT_REASONING_MODEL_NAME_FOR_TEST", "DEFAULT_ENABLE_THINKING_MODEL_NAME_FOR_TEST",
              "DEFAULT_SMALL_EMBEDDING_MODEL_NAME_FOR_TEST",
              "DEFAULT_SMALL_CROSS_ENCODER_MODEL_NAME_FOR_TEST"):
    globals()[_name] = _MODEL
DEFAULT_TIMEOUT_FOR_SERVER_LAUNCH = 600
STDOUT_FILENAME = "/tmp/sglab-upstream-test-stdout.txt"
STDERR_FILENAME = "/tmp/sglab-upstream-test-stderr.txt"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_URL_FOR_TEST = f"http://127.0.0.1:{_free_port()}"
CustomTestCase = unittest.TestCase


def is_in_ci():
    return False


def is_in_amd_ci():
    return False


def run_logprob_check(*args, **kwargs):
    raise unittest.SkipTest("upstream's logprob checker (run_logprob_check) is not shimmed")


def run_and_check_memory_leak(*args, **kwargs):
    raise unittest.SkipTest("upstream's memory-leak harness (it parses its own server log) "
                            "is not shimmed")


def popen_launch_server(model, base_url, timeout=DEFAULT_TIMEOUT_FOR_SERVER_LAUNCH,
                        api_key=None, other_args=(), env=None, return_stdout_stderr=None,
                        **_):
    port = base_url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "sglab.launch_server", "--model-path", _MODEL,
           "--host", "127.0.0.1", "--port", port, *[str(a) for a in other_args]]
    if api_key:
        cmd += ["--api-key", api_key]
    out = return_stdout_stderr or (None, None)
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out[0],
                            stderr=out[1])
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    session = requests.Session()
    session.trust_env = False
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sglab exited with {proc.returncode}: {cmd}")
        try:
            if session.get(f"{base_url}/health_generate", headers=headers,
                           timeout=5).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise TimeoutError("sglab did not come up")
'''

_SRT_UTILS = '''
import psutil


def kill_process_tree(pid, include_parent=True, **_):
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = parent.children(recursive=True) + ([parent] if include_parent else [])
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def kill_child_process(pid, including_parent=True, **_):
    kill_process_tree(pid, include_parent=including_parent)
'''

_ENVIRON = '''
import contextlib
import os


class _Env:
    def __init__(self, name):
        self.name = name

    def get(self):
        return os.environ.get(self.name)

    def set(self, value):
        os.environ[self.name] = str(value)

    @contextlib.contextmanager
    def override(self, value):
        old = os.environ.get(self.name)
        os.environ[self.name] = str(value)
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(self.name, None)
            else:
                os.environ[self.name] = old


class _Envs:
    def __getattr__(self, name):
        return _Env(name)


envs = _Envs()
'''

_RUNNERS = '''
"""Query/document pairs for upstream's rerank cases (sglab serves no cross-encoder)."""
TEST_RERANK_QUERY_DOCS = [
    {"query": "Where is the Eiffel Tower?", "documents": ["It is in Paris."]},
    {"query": "Where is the Eiffel Tower?",
     "documents": ["It is in Paris.", "Paris is in France."]},
]
'''

_SHIM = {
    "sglang/__init__.py": "",
    "sglang/test/__init__.py": "",
    "sglang/test/test_utils.py": _TEST_UTILS,
    "sglang/test/runners.py": _RUNNERS,
    "sglang/test/ci/__init__.py": "",
    "sglang/test/ci/ci_register.py": "def __getattr__(name):\n    return lambda *a, **k: None\n",
    "sglang/srt/__init__.py": "",
    "sglang/srt/utils/__init__.py": _SRT_UTILS,
    "sglang/srt/environ.py": _ENVIRON,
    "sglang/srt/sampling/__init__.py": "",
    "sglang/srt/sampling/sampling_params.py":
        "from sglab.srt.sampling.sampling_params import *  # noqa: F401,F403\n",
    "sglang/srt/utils/hf_transformers_utils.py":
        "from sglab.srt.utils.hf_transformers_utils import get_tokenizer  # noqa: F401\n",
    "sglang/srt/entrypoints/__init__.py": "",
    "sglang/srt/entrypoints/engine.py": "from sglab.srt.entrypoints.engine import Engine  # noqa\n",
    "sglang/srt/sampling/custom_logit_processor.py":
        "from sglab.srt.sampling.custom_logit_processor import *  # noqa: F401,F403\n"
        "from sglab.srt.sampling.custom_logit_processor import CustomLogitProcessor  # noqa\n",
}


def write_shim(root: str, upstream_dir: str) -> None:
    for rel, text in _SHIM.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text).lstrip())
    # Upstream's shared test mixins (sglang/test/kits) only speak HTTP: take them from the checkout.
    kits = os.path.join(upstream_dir, "python", "sglang", "test", "kits")
    if os.path.isdir(kits):
        shutil.copytree(kits, os.path.join(root, "sglang", "test", "kits"), dirs_exist_ok=True)


def run_file(path: str, shim: str, timeout: int) -> dict:
    junit = tempfile.NamedTemporaryFile(suffix=".xml", delete=False).name
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [shim, os.path.join(repo, "python"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "--rootdir", os.path.dirname(path), path]
    # Its own process group: on a timeout the servers the file started go with it.
    proc = subprocess.Popen(cmd, env=env, cwd=os.path.dirname(path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        tail = proc.communicate(timeout=timeout)[0][-3000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"file": path, "timeout": True}
    return {"file": path, **_junit_counts(junit), "tail": tail}


def _junit_counts(path: str) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return counts
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if case.find("skipped") is not None:
            counts["skipped"] += 1
        elif bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            counts["failures"].append(f"{name}: {message[0][:200] if message else ''}")
        else:
            counts["passed"] += 1
    return counts


def to_markdown(results: list[dict]) -> str:
    lines = ["# Upstream SGLang server tests against sglab", "",
             "| file | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
    for r in results:
        if r.get("timeout"):
            lines.append(f"| {r['file']} | timed out | | | |")
            continue
        lines.append(f"| {r['file']} | {r['passed']} | {r['failed']} | {r['errors']} | "
                     f"{r['skipped']} |")
    for r in results:
        for failure in r.get("failures", []):
            lines.append(f"- {os.path.basename(r['file'])}: {failure}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-dir", required=True,
                        help="a sglang checkout (the files are relative to it)")
    parser.add_argument("--files", nargs="+", default=DEFAULT_FILES)
    parser.add_argument("--out", default=None)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per file")
    args = parser.parse_args()
    shim = tempfile.mkdtemp(prefix="sglang-shim-")
    write_shim(shim, args.upstream_dir)
    results = []
    for rel in args.files:
        path = os.path.join(args.upstream_dir, rel)
        if not os.path.exists(path):
            print(f"missing: {path}", file=sys.stderr)
            continue
        results.append(run_file(path, shim, args.timeout))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "tail"}), flush=True)
    markdown = to_markdown(results)
    print(markdown)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "upstream-tests.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "upstream-tests.md"), "w") as f:
            f.write(markdown)


if __name__ == "__main__":
    main()
