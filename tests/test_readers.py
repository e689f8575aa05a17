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
