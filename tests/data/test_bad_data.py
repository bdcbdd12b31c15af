"""Bad corpora and tokenizers: one line naming the file (and the line), exit 2, nothing left behind."""

import gzip
import os

import numpy as np
import pytest

from plait.cli import main
from plait.data import train_bpe

FIX_TOKENIZER = "give the tokenizer.json of a Hugging Face tokenizer"


def tokenizer_without_eot() -> bytes:
    hf = train_bpe(["some text to train on"] * 3, 300)._hf.to_str()
    return hf.replace("<|endoftext|>", "<|something|>").encode()


TOKS = np.array([1, 2, 300, 4], dtype="<u2").tobytes()
# (name, files to write (bytes, or a function making them), extra options, message); {d} is the
# input folder. --data is the folder when it holds several corpus files, else its one corpus file.
CASES = [
        ("malformed jsonl", {"c.jsonl": b'{"text": "ok"}\n{"text": "x"\n'}, [],
         "--data {d}/c.jsonl: line 2: not valid JSON (Expecting ',' delimiter at column 14); fix or remove that line"),
        ("missing field", {"c.jsonl": b'{"text": "ok"}\n\n{"body": "x"}\n'}, [],
         '--data {d}/c.jsonl: line 3: no "text" field; name the field that holds the text with --text-field'),
        ("field not text", {"c.jsonl": b'{"body": ["x"]}\n'}, ["--text-field", "body"],
         '--data {d}/c.jsonl: line 1: the "body" field is list, not text; name the field that holds the text '
         "with --text-field"),
        ("jsonl not utf-8", {"c.jsonl": b'{"text": "ok"}\n{"text": "ok \xff"}\n'}, [],
         "--data {d}/c.jsonl: line 2: not UTF-8 text (byte 13 of the line); convert the file to UTF-8"),
        ("text not utf-8", {"a.txt": b"fine\n", "b.txt": b"ok \xff bad"}, [],
         "--data {d}/b.txt: not UTF-8 text (byte 3); convert it to UTF-8 or remove it"),
        ("gzip cut short", {"c.jsonl.gz": gzip.compress(b'{"text": "a"}\n' * 100)[:30]}, [],
         "--data {d}/c.jsonl.gz: not a readable gzip file (Compressed file ended before the end-of-stream marker "
         "was reached); check the file"),
        ("missing tokenizer", {"a.txt": b"text"}, ["--tokenizer", "{d}/nope.json"],
         f"--tokenizer {{d}}/nope.json: cannot read it (No such file or directory); {FIX_TOKENIZER}"),
        ("tokenizer not json", {"a.txt": b"text", "t.json": b"not json"}, ["--tokenizer", "{d}/t.json"],
         "--tokenizer {d}/t.json: not a tokenizer file (not JSON: Expecting value: line 1 column 1 (char 0)); "
         + FIX_TOKENIZER),
        ("tokenizer json but no tokenizer", {"a.txt": b"text", "t.json": b'{"model": {"type": "BPE"}}'},
         ["--tokenizer", "{d}/t.json"],
         f"--tokenizer {{d}}/t.json: not a tokenizer file (Missing vocab/merges at line 1 column 26); {FIX_TOKENIZER}"),
        ("bin of odd size", {"t.bin": b"abc"}, ["--tokenizer", "byte"],
         "--data {d}/t.bin: its 3 bytes are not a whole number of uint16 tokens (2 bytes each); give the right "
         "--bin-dtype, or a complete file"),
        ("bin of odd size for uint32", {"t.bin": b"abcdef"}, ["--tokenizer", "byte", "--bin-dtype", "uint32"],
         "--data {d}/t.bin: its 6 bytes are not a whole number of uint32 tokens (4 bytes each); give the right "
         "--bin-dtype, or a complete file"),
        ("token id out of the vocabulary", {"t.bin": TOKS}, ["--tokenizer", "byte"],
         "--data {d}/t.bin: token 2 is id 300, not below the tokenizer's vocabulary of 257; give the tokenizer "
         "the file was made with (--tokenizer)"),
        ("bin without its tokenizer", {"t.bin": TOKS}, [],
         "--data {d}/t.bin holds token ids already; give the tokenizer they were made with: --tokenizer "
         "PATH/tokenizer.json, or --tokenizer byte"),
        ("empty jsonl", {"c.jsonl": b""}, [], "--data {d}/c.jsonl: the file is empty; give a file with text in it"),
        ("jsonl of blank lines", {"c.jsonl": b"\n\n"}, [], "--data {d}/c.jsonl: no text in its 0 documents; give some text"),
        ("jsonl of empty texts", {"c.jsonl": b'{"text": ""}\n{"text": ""}\n'}, [],
         "--data {d}/c.jsonl: no text in its 2 documents; give some text"),
        ("empty bin", {"t.bin": b""}, ["--tokenizer", "byte"],
         "--data {d}/t.bin: the file is empty; give a file with tokens in it"),
        ("empty folder", {"x.py": b"print()"}, [],
         "--data {d}: the folder has no .txt, .md, .rst, .jsonl or .jsonl.gz files; put text files in it"),
        ("tokenizer without an end-of-text token", {"a.txt": b"text", "made.json": tokenizer_without_eot},
         ["--tokenizer", "{d}/made.json"],
         "--tokenizer {d}/made.json: it has no end-of-text token (<|endoftext|>, <|end_of_text|>, </s>, <eos>, "
         "<|eot_id|>); add <|endoftext|> to it as a special token"),
]


@pytest.mark.parametrize("name,files,extra,message", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["prepare --out", "prepare", "train"])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, name, files, extra, message, command):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for file, data in files.items():
        (inputs / file).write_bytes(data() if callable(data) else data)
    corpus_files = [f for f in files if not f.endswith(".json")]
    target = inputs / corpus_files[0] if len(corpus_files) == 1 and name != "empty folder" else inputs
    extra = [e.replace("{d}", str(inputs)) for e in extra]
    if command == "prepare --out":
        args = ["prepare", "--out", str(tmp_path / "out")]
    elif command == "prepare":
        args = ["prepare", "--data-dir", str(tmp_path / "cache")]
    else:
        args = ["train", "--dp", "1", "--pp", "1", "--microbatches", "1", "--data-dir", str(tmp_path / "cache"),
                "--out", str(tmp_path / "run")]
    code = main([*args, "--no-progress", "--data", str(target), *extra])
    assert (code, capsys.readouterr().err) == (2, f"plait: error: {message.format(d=inputs)}\n")
    left = sorted(os.listdir(tmp_path))
    assert left in (["in"], ["cache", "in"]), left
    if "cache" in left:
        assert os.listdir(tmp_path / "cache") == []
