"""The `gradweight` command against a real server: outputs, environment defaults, errors, exit codes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gradweight import cli
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch


@pytest.fixture
def files(
    tmp_path: Path, rng: np.random.Generator
) -> tuple[Path, Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    f = {"0": rng.standard_normal((4, 3)).astype(np.float32), "1": rng.standard_normal(5).astype(np.float32)}
    r = {"0": rng.standard_normal((4, 3)).astype(np.float32), "1": rng.standard_normal(5).astype(np.float32)}
    save_file(f, tmp_path / "f.safetensors")
    save_file(r, tmp_path / "r.safetensors")
    return tmp_path / "f.safetensors", tmp_path / "r.safetensors", f, r


def _flat(d: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([d[k].reshape(-1).astype(np.float64) for k in keys])


def test_combine_writes_result(
    live_server: Any, files: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fpath, rpath, f, r = files
    out = tmp_path / "out.safetensors"
    code = cli.main(
        [
            "combine",
            "--url",
            live_server.url,
            "--forget",
            str(fpath),
            "--retain",
            str(rpath),
            "--method",
            '{"name": "simple", "retain_weight": 0.5}',
            "-o",
            str(out),
            "--json",
        ]
    )
    assert code == cli.EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["weights"] == {"retain": 0.5, "forget": 1.0}
    assert summary["numel"] == 17
    assert summary["dtype"] == "float32"  # the protocol's dtype names, as --dtype takes them
    got = load_file(out)["scaled_grad"]
    np.testing.assert_allclose(got, _flat(f, ["0", "1"]) + 0.5 * _flat(r, ["0", "1"]), rtol=1e-6)


def test_combine_params_named_bf16_from_env(
    live_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    f = {"enc.weight": torch.randn(3, 2).bfloat16(), "head.bias": torch.randn(4).bfloat16()}
    r = {k: torch.randn_like(v) for k, v in f.items()}
    save_torch(f, tmp_path / "f.st", metadata={"order": json.dumps(list(f))})
    save_torch(r, tmp_path / "r.st")
    monkeypatch.setenv("GRADWEIGHT_URL", live_server.url)
    out = tmp_path / "o.st"
    code = cli.main(
        [
            "combine",
            "--forget",
            str(tmp_path / "f.st"),
            "--retain",
            str(tmp_path / "r.st"),
            "--method",
            "nash",
            "--layout",
            "params",
            "--dtype",
            "float32",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert text.startswith("nash: ")
    assert "wrote" in text
    from safetensors.torch import load_file as load_torch

    got = load_torch(out)
    assert set(got) == set(f)
    assert got["enc.weight"].shape == (3, 2)
    assert got["enc.weight"].dtype == torch.float32


def test_combine_groups(
    live_server: Any, files: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fpath, rpath, _, _ = files
    args = ["combine", "--url", live_server.url, "--method", "mean", "--json"]
    code = cli.main([*args, "--group", f"a={fpath}", "--group", f"b={rpath}", "--group", f"c={fpath}"])
    assert code == 0
    assert set(json.loads(capsys.readouterr().out)["weights"]) == {"a", "b", "c"}
    assert cli.main([*args, "--group", "oops"]) == cli.EXIT_USAGE
    assert cli.main([*args, "--group", f"a={fpath}", "--forget", str(fpath)]) == cli.EXIT_USAGE


def test_weights_methods_health_info(live_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = ["--url", live_server.url]
    assert cli.main(["weights", *url, "--gram", "[[2, 0.5], [0.5, 1]]", "--method", "nash", "--json"]) == 0
    w = json.loads(capsys.readouterr().out)["weights"]
    assert set(w) == {"retain", "forget"}
    assert cli.main([*url, "methods"]) == 0  # global options before the command work too
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"none", "simple", "munba", "nash"} <= set(names)
    assert cli.main(["health", *url]) == 0
    assert capsys.readouterr().out.strip() == "ready"
    assert cli.main(["info", *url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"]


def test_errors_and_exit_codes(
    live_server: Any, make_server: Any, files: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fpath, rpath, _, _ = files
    url = ["--url", live_server.url]
    code = cli.main(["combine", *url, "--forget", str(fpath), "--retain", str(rpath), "--method", "nope"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_API
    assert "invalid-method" in err
    assert "request" in err
    assert "Traceback" not in err
    code = cli.main(["combine", *url, "--forget", str(tmp_path / "missing"), "--method", "nash"])
    assert code == cli.EXIT_USAGE
    assert "missing" in capsys.readouterr().err
    (tmp_path / "junk").write_bytes(b"\x00" * 3)
    code = cli.main(["combine", *url, "--forget", str(tmp_path / "junk"), "--method", "nash"])
    assert code == cli.EXIT_USAGE
    assert "not a valid safetensors" in capsys.readouterr().err
    assert cli.main(["weights", *url, "--gram", "[[1, 0]", "--method", "nash"]) == cli.EXIT_USAGE
    assert cli.main(["weights", *url, "--gram", "[[1, 0], [0, -1]]", "--method", "nash"]) == cli.EXIT_API
    secured = make_server(token="tok", warmup=False)
    assert cli.main(["methods", "--url", secured.url]) == cli.EXIT_API
    assert "unauthorized" in capsys.readouterr().err
    assert cli.main(["methods", "--url", secured.url, "--token", "tok"]) == 0
    port = secured.port
    secured.stop()
    code = cli.main(["health", "--url", f"http://127.0.0.1:{port}"])  # no retries by default: "up now?"
    assert code == cli.EXIT_TRANSPORT
    assert "cannot reach" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["combine"])
    assert info.value.code == cli.EXIT_USAGE


def test_readme_cli_block_is_one_command_per_line() -> None:
    """Every line of the README's CLI block is one `gradweight` command the parser accepts as written."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"### CLI\n.*?```sh\n(.*?)```", readme, flags=re.S)
    assert block is not None
    lines = [ln.split("   #")[0].strip() for ln in block.group(1).splitlines() if ln.strip()]
    commands = [ln for ln in lines if not ln.startswith("export ")]
    assert len(commands) >= 7
    for line in commands:
        argv = shlex.split(line)
        assert argv[0] == "gradweight", line
        assert "|" not in argv, line
        cli._parser().parse_args(argv[1:])  # SystemExit on a line that would not run
