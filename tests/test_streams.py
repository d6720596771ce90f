"""One error path and clean streams for every command: stdout carries only the JSON result, bad input and OS
errors give `hwnas: error: ...` with exit 2, outputs are never clobbered, a second run on an output is refused."""
import json
import os
import shutil
import signal

import pytest

from hwnas import cli
from hwnas.common import atomic_dir, output_lock


def fake_command(monkeypatch, body):
    """Make `hwnas space` run `body(**kwargs)` instead, to drive main's plumbing directly."""
    monkeypatch.setattr(cli, "space", lambda **kw: body(**kw))


def test_stdout_carries_only_the_json_even_when_libraries_print(monkeypatch, capfd):
    def noisy(**kw):
        print("INFO: a library's table")
        os.write(1, b"native code's line\n")  # below Python, as OpenVINO and NNCF write
        return {"ok": 1}

    fake_command(monkeypatch, noisy)
    assert cli.main(["space"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"ok": 1}
    assert "a library's table" in err and "native code's line" in err


@pytest.mark.parametrize("error, expected", [
    (PermissionError(13, "Permission denied", "/ro/out"), "hwnas: error: Permission denied: /ro/out (expected a "
                                                           "location this user can write, with free space)"),
    (OSError(28, "No space left on device", "/full/model.safetensors"), "No space left on device: /full/"),
])
def test_os_errors_are_one_line_with_exit_2(monkeypatch, capfd, error, expected):
    def fail(**kw):
        raise error

    fake_command(monkeypatch, fail)
    assert cli.main(["space"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sigterm_removes_the_half_written_output(monkeypatch, tmp_path, capfd):
    out = tmp_path / "out"

    def killed_while_writing(**kw):
        with atomic_dir(out) as d:
            (d / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)

    fake_command(monkeypatch, killed_while_writing)
    assert cli.main(["space"]) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [] and "interrupted" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not cli._on_sigterm  # the handler is only there during a command


def test_a_second_run_on_the_same_output_is_refused(tiny_model, tmp_path, capfd):
    out = tmp_path / "cfg.json"
    with output_lock(out):  # another run holds it
        assert cli.main(["sample", "--model", str(tiny_model), "--out", str(out)]) == 2
    assert "is being written by another hwnas run" in capfd.readouterr().err and not out.exists()
    assert cli.main(["sample", "--model", str(tiny_model), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json"]  # the lock file went with the run


def test_writers_refuse_an_existing_target_without_overwrite(tiny_model, tmp_path, capfd):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert cli.main(["sample", "--model", str(tiny_model), "--out", str(notes)]) == 2
    assert notes.read_text() == "mine" and "pass --overwrite" in capfd.readouterr().err
    assert cli.main(["sample", "--model", str(tiny_model), "--out", str(notes), "--overwrite"]) == 0
    assert json.loads(notes.read_text())["layers"]
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    table = tmp_path / "table.json"
    table.write_text("{}")
    assert cli.main(["search", "--model", str(tiny_model), "--table", str(table), "--out", str(folder)]) == 2
    assert "is an existing non-empty folder; pass --overwrite" in capfd.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["--prefill", "100000"], "--prefill 100000 does not fit"),
    (["--decode", "64"], "--decode 64 does not fit"),
    (["--calibration", "2"], "--calibration must be 0 (no end-to-end correction) or at least 3"),
])
def test_profile_refuses_what_it_cannot_measure(tiny_model, tmp_path, capfd, args, message):
    positions = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    args = [a.replace("64", str(positions)) for a in args]
    message = message.replace("64", str(positions))
    rc = cli.main(["profile", "--model", str(tiny_model), "--runtime", "torch", "--out", str(tmp_path / "t.json"),
                   *args])
    assert rc == 2 and message in capfd.readouterr().err and not (tmp_path / "t.json").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_load(tiny_model, tmp_path, capfd):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    vocab = cfg["vocab_size"]
    cfg["vocab_size"] = vocab - 10
    (bad / "config.json").write_text(json.dumps(cfg))
    for argv in (["space", "--model", str(bad)], ["sample", "--model", str(bad), "--out", str(tmp_path / "c.json")]):
        assert cli.main(argv) == 2
        err = capfd.readouterr().err
        assert f"the tokenizer has {vocab} token ids but the model's vocab_size is {vocab - 10}" in err
    assert not (tmp_path / "c.json").exists()


def test_progress_in_a_log_is_plain_lines(monkeypatch, capsys):
    from hwnas.progress import tqdm

    monkeypatch.setenv("HWNAS_PROGRESS_EVERY", "0")
    with tqdm(total=3, desc="search nsga2", unit="eval") as bar:  # stderr is captured: not a terminal
        for i in range(3):
            bar.update(1)
            bar.set_postfix_str(f"gen {i}")
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert lines[0].startswith("search nsga2: 0/3") and lines[-1].startswith("search nsga2: 3/3")
    assert lines[-1].endswith("gen 2]") and len(lines) == len(set(lines))
