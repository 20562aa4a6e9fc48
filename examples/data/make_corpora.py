"""Make the two small text corpora of the examples from Debian packages (see SOURCES.md).

    apt-get download wamerican-large dict-devil
    dpkg -x wamerican-large_*.deb pkg/ && dpkg -x dict-devil_*.deb pkg/
    python examples/data/make_corpora.py pkg/

writes examples/names.txt (proper names from the SCOWL word list, one a line) and
examples/data/devil_sentences.txt (sentences of The Devil's Dictionary, one a line).
The output is deterministic: the same packages give the same files.
"""
from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADWORD = re.compile(r"^[A-Z][A-Z'\- ]*(?:,\s*[a-z][a-z. ]*?\.)?\s{2,}")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
PLAIN = re.compile(r"^[A-Za-z][A-Za-z ,;:'\-]*[.!?]$")


def names(word_list: Path) -> list[str]:
    """Capitalised words of letters only (no possessives, no plural of another name), 3 to 10 letters."""
    words = word_list.read_text(encoding="utf-8").split()
    proper = {w for w in words if re.fullmatch(r"[A-Z][a-z]+", w) and 3 <= len(w) <= 10}
    return sorted(w for w in proper if not (w.endswith("s") and w[:-1] in proper))


def sentences(dict_dz: Path) -> list[str]:
    """Prose sentences of the definitions (no verse, no preface), 4 to 30 words, letters and punctuation."""
    text = gzip.decompress(dict_dz.read_bytes()).decode("utf-8")
    body = text[text.index("ABASEMENT, n."):]
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", body):
        lines = paragraph.split("\n")
        if not lines or lines[0].startswith(" "):
            continue                                   # verse and quotations are indented
        prose = HEADWORD.sub("", " ".join(line.strip() for line in lines))
        prose = prose.replace("_", "").replace(" -- ", ", ").replace("--", ", ")
        for sentence in SENTENCE_END.split(prose):
            sentence = re.sub(r"\s+", " ", sentence).strip()
            if PLAIN.match(sentence) and 4 <= len(sentence.split()) <= 30:
                out.append(sentence)
    return list(dict.fromkeys(out))                    # first occurrence of each, in book order


def main(package_root: str) -> None:
    root = Path(package_root)
    (HERE.parent / "names.txt").write_text(
        "\n".join(names(root / "usr/share/dict/american-english-large")) + "\n", encoding="utf-8")
    (HERE / "devil_sentences.txt").write_text(
        "\n".join(sentences(root / "usr/share/dictd/devil.dict.dz")) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pkg")
