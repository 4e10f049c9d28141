"""``serve``'s command line: CPU defaults, the per-CPU dtype, and user flags winning."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang_cacheblend import launch
from sglang_cacheblend.launch import cpu_dtype, serve_argv

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
AMX = "processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_bf16\n"


@pytest.mark.parametrize(("cpuinfo", "expected"), [
    (AVX2_ONLY, "float32"), (AVX512_BF16, "bfloat16"), (AMX, "bfloat16"),
])
def test_cpu_dtype_is_bf16_only_with_native_bf16(tmp_path: Path, cpuinfo: str, expected: str):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_dtype(path) == expected


def test_cpu_dtype_without_cpuinfo_is_float32(tmp_path: Path):
    assert cpu_dtype(tmp_path / "missing") == "float32"


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cpu_defaults_fill_what_the_user_did_not_give(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    argv = serve_argv(["--dtype", "bfloat16", "--port", "31000"], model_path=tmp_path)
    assert _flag(argv, "--dtype") == "bfloat16" and argv.count("--dtype") == 1
    assert _flag(argv, "--host") == "127.0.0.1"
    assert _flag(argv, "--model-path") == str(tmp_path)
    assert _flag(argv, "--device") == "cpu" and "--sleep-on-idle" in argv

    argv = serve_argv([], model_path=tmp_path)
    assert _flag(argv, "--dtype") == cpu_dtype()


def test_no_cpu_flags_with_a_gpu(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(launch, "has_cuda", lambda: True)
    argv = serve_argv(["--host", "127.0.0.1"], model_path=tmp_path)
    assert "--device" not in argv and "--dtype" not in argv and argv.count("--host") == 1
