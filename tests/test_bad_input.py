"""Bad input found at run time: refused before any work, one line, exit code 2."""

import socket

import pytest

from plait.cli import main

ONE = ["--dp", "1", "--pp", "1", "--microbatches", "1", "--no-progress"]
SMALL = [*ONE, "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--seq-len", "16", "--global-batch", "2",
         "--steps", "1", "--eval-batches", "1", "--sample-tokens", "0"]


def busy_port():
    s = socket.create_server(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def run(args, capsys):
    code = main(["train", *args])
    return code, capsys.readouterr().err


def test_rendezvous_port_already_in_use(capsys):
    holder, port = busy_port()
    with holder:
        code, err = run(["--nnodes", "2", "--node-rank", "0", "--rdzv", f"127.0.0.1:{port}"], capsys)
    assert (code, err) == (2, f"plait: error: --rdzv 127.0.0.1:{port}: cannot listen there (Address already in "
                              f"use); choose a free port, or an address of this machine\n")


@pytest.mark.parametrize("files", [{}, {"a.txt": "", "b.md": ""}], ids=["no text files", "empty files"])
def test_empty_corpus(tmp_path, files, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in files.items():
        (corpus / name).write_text(text)
    code, err = run([*SMALL, "--data", str(corpus), "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "r")],
                    capsys)
    assert code == 2
    expected = (f"--data {corpus}: the folder has no .txt, .md or .rst files; put text files in it" if not files
                else f"--data {corpus}: all 2 text files in the folder are empty; give some text")
    assert err == f"plait: error: {expected}\n"
    assert not (tmp_path / "r").exists()


def test_resume_with_another_model_shape(tmp_path, data_dir, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *SMALL, "--data-dir", data_dir, "--out", str(run_dir)]) == 0
    capsys.readouterr()
    code, err = run(["--resume", str(run_dir), "--n-embd", "32", "--steps", "2"], capsys)
    assert code == 2
    assert err == (f"plait: error: checkpoint {run_dir}/checkpoints/step-000001 holds a different model: "
                   f"0.wte.weight is [2048, 16] there, [2048, 32] here; resume with the run's own model options\n")
