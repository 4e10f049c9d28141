"""Start an SGLang server with this project's defaults, and manage one from Python.

``serve_argv`` turns whatever SGLang flags the user gave into a full ``sglang.launch_server``
command line: it adds the embedded model when no ``--model-path`` is given, binds to 127.0.0.1
unless told otherwise, and on a machine without a GPU fills the CPU-safe flags measured on the
2-core CPU machines (torch_native attention, no CUDA graphs, a bounded KV pool; the reason for
each is at :data:`CPU_DEFAULTS`, and docs/usage.md lists them). A flag the user gave always wins.

``ServerProcess`` is the context manager the demo, the tests and the benchmarks share: it starts
the server in its own process group, waits until it answers, and kills the whole group on exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 30000

# Measured with SGLang 0.5.23 on the 2-core CPU machines: there is no CPU build of sgl-kernel, so
# attention and sampling use SGLang's plain torch backends and CUDA graphs are off; without
# --mem-fraction-static the CPU memory estimate can go negative (the scheduler refuses to start),
# and without --max-total-tokens the pool is sized from free RAM. A blended prompt must not be
# split by chunked prefill (a split one is prefilled normally), hence --chunked-prefill-size -1.
# ``--dtype`` is chosen per CPU by :func:`cpu_dtype`. ``--sleep-on-idle``: an idle scheduler
# otherwise polls its sockets in a busy loop, taking one of the two cores from every other
# process (a client computing references, a benchmark's dense baseline).
CPU_DEFAULTS: tuple[tuple[str, str | None], ...] = (
    ("--device", "cpu"),
    ("--attention-backend", "torch_native"),
    ("--sampling-backend", "pytorch"),
    ("--disable-cuda-graph", None),
    ("--sleep-on-idle", None),
    ("--max-total-tokens", "40000"),
    ("--mem-fraction-static", "0.3"),
    ("--chunked-prefill-size", "-1"),
)


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# CPU flags under which torch runs bf16 matrix products natively.
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The serving dtype on a CPU: bf16 only where the CPU multiplies bf16 natively.

    Without AVX512-BF16 or AMX, torch's bf16 GEMM is emulated: on the 2-core EPYC (AVX2) dev
    machine a 1216x576 @ 576x1536 product ran at 1.3 GFLOPS in bf16 and 54 GFLOPS in fp32, so
    a bf16 server spent ~20 s prefilling 1.2k tokens of the 135M model. fp32 doubles the KV
    pool's bytes, which the bounded ``--max-total-tokens`` keeps small.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "float32"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return "bfloat16" if flags & _NATIVE_BF16_FLAGS else "float32"


def _given(argv: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def serve_argv(user_args: list[str], *, model_path: Path | None = None) -> list[str]:
    """Complete ``user_args`` into ``sglang.launch_server`` arguments (see module docstring)."""
    argv = list(user_args)
    if not _given(argv, "--model-path") and not _given(argv, "--model"):
        if model_path is None:
            from sglang_cacheblend.embedded_model import ensure_model

            model_path = ensure_model()
        argv += ["--model-path", str(model_path)]
    if not _given(argv, "--host"):
        argv += ["--host", DEFAULT_HOST]
    if not has_cuda():
        for flag, value in (*CPU_DEFAULTS, ("--dtype", cpu_dtype())):
            if not _given(argv, flag):
                argv += [flag] if value is None else [flag, value]
    return argv


def server_env() -> dict[str, str]:
    """Environment additions for a server ``serve`` starts: off CUDA, the plugin's rotary fix
    (needed by SGLang on this device whether or not CacheBlend is enabled)."""
    from sglang_cacheblend.options import NATIVE_ROTARY_ENV_VAR

    return {} if has_cuda() else {NATIVE_ROTARY_ENV_VAR: "1"}


def launch_command(user_args: list[str], *, model_path: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", *serve_argv(user_args, model_path=model_path)]


@dataclass
class ServerProcess:
    """An SGLang server in a child process group, bound to loopback.

    Use as a context manager; ``base_url`` is valid inside it. ``log_path`` collects the
    server's stdout and stderr so a failed start can be explained.
    """

    args: list[str] = field(default_factory=list)
    port: int = DEFAULT_PORT
    model_path: Path | None = None
    log_path: Path | None = None
    startup_timeout_s: float = 600.0
    env: dict[str, str] | None = None
    progress: bool = False  # a progress bar while the server starts (the demo shows one)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log_file: object = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_running(self) -> bool:
        """Whether the server process is still alive (a soak counts deaths with it)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def base_url(self) -> str:
        return f"http://{DEFAULT_HOST}:{self.port}"

    def start(self) -> "ServerProcess":
        if _given(self.args, "--host") or _given(self.args, "--port"):
            raise ValueError("ServerProcess owns --host and --port; pass port= instead")
        cmd = launch_command(
            [*self.args, "--host", DEFAULT_HOST, "--port", str(self.port)],
            model_path=self.model_path,
        )
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self._log_file = log
        env = {**os.environ, **server_env(), **(self.env or {})}
        self._proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._wait_ready()
        return self

    def wait(self) -> None:
        """Block until the server exits or the user presses Ctrl-C (``--keep-server``)."""
        try:
            self._proc.wait()
        except KeyboardInterrupt:
            pass

    def _wait_ready(self) -> None:
        from tqdm.auto import tqdm

        deadline = time.monotonic() + self.startup_timeout_s
        bar = tqdm(desc="start the server", unit="s", disable=not self.progress,
                   bar_format="{desc}: {elapsed}")
        try:
            self._poll_until_ready(deadline, bar)
        finally:
            bar.close()

    def _poll_until_ready(self, deadline: float, bar) -> None:
        while time.monotonic() < deadline:
            bar.update()
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"SGLang server exited with code {self._proc.returncode} during startup"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                if requests.get(self.base_url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"SGLang server not ready after {self.startup_timeout_s:.0f} s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            pgid = os.getpgid(self._proc.pid)
            os.killpg(pgid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self._proc.wait(timeout=30)
            # Scheduler/detokenizer children share the group; make sure none survive.
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._proc = None
        if self._log_file not in (None, subprocess.DEVNULL):
            self._log_file.close()
        self._log_file = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
