"""`berry export` end to end: the --verify table, and one-line refusals."""

from __future__ import annotations

import re

from tests.conftest import make_checkpoint


def test_export_gguf_q8_0_verify_table(tmp_path, tokenizer, capsys):
    from berrylm.cli import main

    ckpt = make_checkpoint(tmp_path / "ck", tokenizer, "berry-1.8m", init_std=0.15)
    assert main(["export", str(ckpt), "--to", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "out"),
                 "--verify"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "out" / "berry-1.8m-q8_0.gguf").is_file()
    rows = {m[0]: (float(m[1]), float(m[2])) for m in
            re.findall(r"^\| (llama\.cpp[^|]*?) \| ([0-9.e+-]+) \| ([0-9.]+)% \|", out, re.M)}
    assert len(rows) == 2, out
    quantization, arithmetic = rows.values()
    assert arithmetic[0] < quantization[0] and arithmetic[1] >= 99.0  # same weights: far closer


def test_export_refusals_are_one_line(tmp_path, tokenizer, capsys):
    from berrylm.cli import main

    hybrid = make_checkpoint(tmp_path / "hy", tokenizer, "strawberry-1.8m")
    assert main(["export", str(hybrid), "--to", "gguf", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "llama.cpp has no such architecture" in err and "\n" not in err and "Traceback" not in err
    # a model path that cannot be loaded is a model-file error: exit 2 (berry.py)
    assert main(["export", str(tmp_path / "missing"), "--to", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
