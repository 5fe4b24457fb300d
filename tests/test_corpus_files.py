"""Corpus files and the default corpus say what is wrong, where, and once (issue 26, "Nothing silently wrong").

- A malformed calibration or evaluation file (``.jsonl``: one ``{"text": ...}`` per line; ``.txt``: one document)
  is refused by the preflight, before any weight is read, with a :class:`UserError` naming the file and the line
  (old main: a bare ``KeyError: 'text'``, a ``JSONDecodeError`` at "line 1" of the one line, a
  ``UnicodeDecodeError`` at a file offset, or the tokenizer's "You need to specify either text or text_target").
- The default run (``owt_offline``, ``calibration.sampling=windows``, 128 x 512) falls back to the joined stream,
  as the README documents: old main warned about it once in the search and again in the Wanda baseline; now it
  is a note, said once per run, and the calibration tokens are the same.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from _helpers import real_model_prepared, tiny_overrides
from unipruning_cli.data import corpora as data
from unipruning_cli.core.config import compose_prune
from unipruning_cli.core.errors import UserError

GOOD = json.dumps({"text": "A line of text that is long enough to count. " * 4})

# name -> (file name, its bytes, the message expected: file and line named)
MALFORMED = {
    "missing_text": ("c.jsonl", f'{GOOD}\n{GOOD}\n{{"title": "no text here"}}\n',
                     r'c\.jsonl, line 3: no "text" field \(its keys: \'title\'\)'),
    "null_text": ("c.jsonl", f'{GOOD}\n{{"text": null}}\n{GOOD}\n', r'c\.jsonl, line 2: "text" is null, not a string'),
    "number_text": ("c.jsonl", f'{GOOD}\n{{"text": 5}}\n', r'c\.jsonl, line 2: "text" is 5, not a string'),
    "not_an_object": ("c.jsonl", f'{GOOD}\n["text", "x"]\n',
                      r'c\.jsonl, line 2: \["text", "x"\] is not a JSON object'),
    # a blank line before it: the line of the file, not of the non-blank lines (nor "line 1" of the one line)
    "bad_json": ("c.jsonl", f'{GOOD}\n\n{GOOD}\n{{"text": "unterminated\n{GOOD}\n', r"c\.jsonl, line 4: not JSON"),
    "bad_utf8_jsonl": ("c.jsonl", f'{GOOD}\n{GOOD}\n'.encode() + b'{"text": "abcdef\xff ghi"}\n',
                       r"c\.jsonl, line 3, byte 17: not UTF-8"),
    "bad_utf8_txt": ("c.txt", b"first line of text, long enough to pass the size check\ncaf\xe9\n",
                     r"c\.txt, line 2, byte 4: not UTF-8"),
    "empty_jsonl": ("c.jsonl", "", r"c\.jsonl holds no text"),
    "blank_lines_jsonl": ("c.jsonl", "\n   \n\n" + " " * 40 + "\n", r"c\.jsonl holds no text"),
    "empty_texts_jsonl": ("c.jsonl", '{"text": ""}\n{"text": "   "}\n{"text": "\\n\\n"}\n' * 3,
                          r"c\.jsonl holds no text"),
    "empty_txt": ("c.txt", "", r"c\.txt holds no text"),
    "blank_txt": ("c.txt", " \n" * 40, r"c\.txt holds no text"),
}


def _write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize("role", ["calibration.source", "eval.corpora"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_corpus_file_is_refused_by_the_preflight_naming_its_line(case, role, tmp_path, monkeypatch,
                                                                              tiny_llama_dir, corpus_files,
                                                                              isolated_env):
    from unipruning_cli.stages.preflight import validate

    name, content, message = MALFORMED[case]
    path = _write(tmp_path, name, content)
    key = "calibration.source" if role == "calibration.source" else "eval.corpora"
    value = str(path) if role == "calibration.source" else f"[{path}]"

    def no_weights(*a, **k):
        raise AssertionError("a model weight was read before the corpus file was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    monkeypatch.setattr("unipruning_cli.models.loading.load_model", no_weights)
    with pytest.raises(UserError, match=rf"^{key}: corpus file .*{message}"):
        validate(compose_prune(tiny_overrides(tiny_llama_dir, corpus_files, **{key: value})))


@pytest.mark.parametrize("case", ["missing_text", "bad_json", "bad_utf8_jsonl", "empty_texts_jsonl", "empty_txt"])
def test_reading_a_malformed_corpus_file_raises_the_same_error_after_the_load(case, tmp_path):
    """The corpus is read again after the load (and by ``unipruning eval``): the same message, not a bare one."""
    name, content, message = MALFORMED[case]
    with pytest.raises(UserError, match=message):
        data.load_documents(str(_write(tmp_path, name, content)), "calibration")


def test_well_formed_files_read_as_before(tmp_path):
    """Blank lines skipped, empty texts kept (they count in the windows' document draws), CRLF read as LF, a
    U+2028 inside a JSON string kept in its document (str.splitlines cut the line there: bad JSON before)."""
    texts = ["first document", "", "third\u2028with a line separator", "fourth"]
    body = "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts[:2]) + "\r\n\r\n" + \
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts[2:]) + "\n"
    assert data.load_documents(str(_write(tmp_path, "ok.jsonl", body)), "eval") == texts
    assert data.load_documents(str(_write(tmp_path, "ok.txt", "one\r\ntwo\rthree\n")), "eval") == ["one\ntwo\nthree\n"]


# ------------------------------------------------------------------------------------------------
# The default run's fallback from windows inside documents to the joined stream: a note, said once.


def _fallbacks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "tokens" in r.getMessage() and "joined with blank lines" in r.getMessage()]


def _run_like(cfg, tok, monkeypatch):
    """What a default run does with its calibration: the preflight (same tokenizer object here, the hardest case
    for saying it once), then the search and the wanda@one_shot baseline each ask for the samples."""
    from unipruning_cli.stages import preflight
    from unipruning_cli.data.calibration_set import calibration_set

    monkeypatch.setattr(preflight, "_tokenizer", lambda *a: tok)
    monkeypatch.setattr(data, "_DOCS", {}, raising=False)
    monkeypatch.setattr(data, "_STREAMS", {})
    preflight.check_corpus_tokens(cfg)
    return [calibration_set(cfg, tok) for _ in range(2)]


def test_the_default_corpus_falls_back_with_one_note_not_a_warning_per_stage(monkeypatch, caplog, tiny_tokenizer):
    """``owt_offline`` is paragraphs: the default windows come from the joined stream, as documented, so the run
    says so once, as a note. Its documents stand in here (short paragraphs) for the tiny tokenizer."""
    paragraphs = [" ".join(f"w{d}x{k}" for k in range(2 + d % 5)) for d in range(300)]  # < 64 tokens
    real = data.load_documents
    monkeypatch.setattr(data, "load_documents", lambda s, r: paragraphs if s == "owt_offline" else real(s, r))
    cfg = compose_prune(["calibration.seqlen=64", "calibration.nsamples=16", "eval.corpora=[]"])
    assert cfg.calibration.source == "owt_offline" and cfg.calibration.sampling == "windows"
    with caplog.at_level(logging.INFO, logger="unipruning_cli"):
        runs = _run_like(cfg, tiny_tokenizer, monkeypatch)
    said = _fallbacks(caplog)
    assert len(said) == 1 and said[0].levelno == logging.INFO, [r.getMessage() for r in said]
    assert "only 0 document(s) of owt_offline" in said[0].getMessage()
    stream = tiny_tokenizer("\n\n".join(paragraphs), return_tensors="pt").input_ids[0]
    for samples, info in runs:  # the same tokens as before: the stream's seeded windows
        assert info["sampling"] == "stream" and info["requested"] == "windows"
        assert torch.equal(samples.as_tensor(), data.calibration_windows(stream, 16, 64, 0))


def test_a_user_file_of_short_documents_still_warns_but_once(tmp_path, monkeypatch, caplog, tiny_tokenizer):
    path = _write(tmp_path, "short.jsonl", "".join(json.dumps({"text": f"short doc {i} " * 3}) + "\n"
                                                   for i in range(200)))
    cfg = compose_prune([f"calibration.source={path}", "calibration.seqlen=64", "calibration.nsamples=16",
                         "eval.corpora=[]"])
    with caplog.at_level(logging.INFO, logger="unipruning_cli"):
        _run_like(cfg, tiny_tokenizer, monkeypatch)
    said = _fallbacks(caplog)
    assert len(said) == 1 and said[0].levelno == logging.WARNING, [r.getMessage() for r in said]


@pytest.mark.skipif(not real_model_prepared(), reason="needs `unipruning prepare` (the embedded model)")
def test_the_default_config_does_not_warn_about_itself(monkeypatch, caplog):
    """``unipruning prune`` with every default: no warning from the corpus, one note, the same 128 x 512 tokens
    (the joined stream's seeded windows: the README's and the bench gate's figures depend on them)."""
    from transformers import AutoTokenizer

    from unipruning_cli.models.loading import model_location

    cfg = compose_prune([])
    tok = AutoTokenizer.from_pretrained(model_location(cfg.model))
    with caplog.at_level(logging.INFO, logger="unipruning_cli"):
        runs = _run_like(cfg, tok, monkeypatch)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert len(_fallbacks(caplog)) == 1
    stream = data.token_stream(tok, "owt_offline", "calibration")
    for samples, _ in runs:
        assert torch.equal(samples.as_tensor(), data.calibration_windows(stream, 128, 512, 0))
