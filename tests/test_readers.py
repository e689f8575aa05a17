import random

import pytest

import preprocess.readers as readers
from preprocess.errors import UserError
from preprocess.readers import SegmentReader, expand_inputs, plan_segments


def test_byte_ranges_cover_every_line_exactly_once(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "READ_BLOCK", 7)  # lines longer than a read block, cut points inside them
    rng = random.Random(0)
    for trial in range(200):
        lines = [f'{{"n": {i}, "pad": "{"x" * rng.randint(0, 40)}"}}' for i in range(rng.randint(0, 25))]
        data = "\n".join(lines) + ("\n" if rng.random() < 0.7 else "")
        path = tmp_path / f"{trial}.jsonl"
        path.write_text(data)
        segments = plan_segments([str(path)], rng.randint(1, 60), "file")
        assert (segments[0].start, segments[-1].end) == (0, len(data)) if data else segments == []
        assert all(a.end == b.start for a, b in zip(segments, segments[1:], strict=False))
        assert all(s.start == 0 or data.encode()[s.start - 1] == ord("\n") for s in segments)
        records = [rec["n"] for seg in segments for _, rec in SegmentReader(seg)]
        assert records == list(range(len(lines)))


def test_inputs_are_expanded_sorted_and_checked(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for name in ["d/b.jsonl", "d/a.txt", "d/sub/c.parquet", "d/notes.csv", "d/.x.jsonl", "d/.hidden/y.jsonl"]:
        (tmp_path / name).write_text("")
    found = expand_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "b.jsonl")])
    assert found == [str(tmp_path / p) for p in ("d/a.txt", "d/b.jsonl", "d/sub/c.parquet")]
    assert expand_inputs([str(tmp_path / "d" / "*.jsonl")]) == [str(tmp_path / "d" / "b.jsonl")]
    with pytest.raises(UserError, match="unsupported input format"):
        expand_inputs([str(tmp_path / "d" / "notes.csv")])
    with pytest.raises(UserError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.none")])


@pytest.mark.parametrize("block", [7, 1 << 20])
def test_text_lines_end_at_lf_crlf_or_a_lone_cr(tmp_path, monkeypatch, block):
    # Old Mac text (War and Peace in ../shared/data) ends lines with CR alone: one document per line means per
    # CR too. Cuts and read blocks inside "\r\n" must neither split a line nor add one, and line numbers count
    # every kind of line end.
    monkeypatch.setattr(readers, "READ_BLOCK", block)
    rng = random.Random(block)
    for trial in range(60):
        lines = [f"line {i} " + "x" * rng.randint(0, 30) for i in range(rng.randint(1, 40))]
        ends = [rng.choice(["\n", "\r", "\r\n", "\r\r\n", "\n\r"]) for _ in lines]
        data = "".join(a + b for a, b in zip(lines, ends, strict=True)).encode()
        path = tmp_path / f"{trial}.txt"
        path.write_bytes(data)
        segments = plan_segments([str(path)], rng.randint(1, 80), "line")
        assert all(a.end == b.start for a, b in zip(segments, segments[1:], strict=False))
        assert not any(data[s.start - 1:s.start + 1] == b"\r\n" for s in segments if s.start)  # no cut inside CRLF
        got, numbered = [], []
        for seg in segments:
            reader = SegmentReader(seg, txt_doc="line")
            for pos, text in reader:
                got.append(text)
                numbered.append(int(reader.where(pos).rpartition(":")[2]))
        assert got == lines
        every_line = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").decode().split("\n")
        assert [every_line[n - 1] for n in numbered] == lines


def test_war_and_peace_is_one_document_per_line(tmp_path):
    from conftest import shared_data

    path = shared_data("war_and_peace", "warpeace_input.txt")
    raw = open(path, "rb").read().decode("utf-8").removeprefix("\ufeff")
    expected = [line for line in raw.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    segments = plan_segments([path], 100_000, "line")
    assert len(segments) > 20 and len(expected) > 40_000
    assert [t for seg in segments for _, t in SegmentReader(seg, txt_doc="line")] == expected
