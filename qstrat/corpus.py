"""Real English text for measuring a model, from a package: never downloaded at run time.

The package ``gensim`` (in the test extra) ships, among its test data, a shortened dump of
English Wikipedia: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(MediaWiki XML, about 100 articles: Anarchism, Autism, Albedo, ...; Wikipedia's text is
CC BY-SA).  Only that file is read: gensim itself is never imported.

:func:`wikipedia_text` turns its articles into plain text, with a simple, deterministic
cleaner (:func:`clean_wikitext`): the same package version always gives the same bytes.
``python -m qstrat.corpus OUT.txt`` writes it, for ``qstrat eval --text``.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from qstrat.errors import InputError

WIKIPEDIA_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

#: sections from which on an article is lists of links and sources, not prose
TRAILING_SECTIONS = {"see also", "references", "external links", "further reading", "notes", "bibliography", "sources",
                     "footnotes", "notes and references", "citations"}
#: links to these namespaces are images, categories or other languages: dropped with their text
DROPPED_LINKS = re.compile(r"\s*:?\s*(file|image|media|category|wikt|wiktionary|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)
#: elements whose content is not prose
DROPPED_ELEMENTS = ("ref", "math", "gallery", "timeline", "code", "pre", "source", "syntaxhighlight", "score", "imagemap", "hiero", "chem")


def wikipedia_dump() -> Path:
    """The path of gensim's shortened English Wikipedia dump (without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the Wikipedia text needs the package gensim (pip install gensim, or pip install 'qstrat[test]')")
    path = Path(next(iter(spec.submodule_search_locations))) / WIKIPEDIA_DUMP
    if not path.is_file():
        raise InputError(f"{path}: not found in the installed gensim (its test data is needed)")
    return path


def iter_articles(dump: Path) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of each article of a MediaWiki XML dump (.xml or .xml.bz2), in order:
    main namespace only, redirects left out."""
    opener = bz2.open if str(dump).endswith(".bz2") else open
    with opener(dump, "rb") as stream:
        title, namespace, redirect, text = "", "", False, ""
        for _, element in ET.iterparse(stream, events=("end",)):
            tag = element.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = element.text or ""
            elif tag == "ns":
                namespace = element.text or ""
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = element.text or ""
            elif tag == "page":
                if namespace == "0" and not redirect and not text.lstrip().upper().startswith("#REDIRECT"):
                    yield title, text
                title, namespace, redirect, text = "", "", False, ""
                element.clear()


def _remove_nested(text: str, opening: str, closing: str) -> str:
    """Remove every ``opening ... closing`` span, nested ones included (innermost first)."""
    pattern = re.compile(re.escape(opening) + r"(?:(?!" + re.escape(opening) + r")(?!" + re.escape(closing) + r").)*?" + re.escape(closing), re.DOTALL)
    while True:
        text, count = pattern.subn("", text)
        if not count:
            return text


def _remove_media_links(text: str) -> str:
    """Remove each file, image, category or other-language link with its caption, whose text
    may hold links and single brackets of its own: its end is the ``]]`` that balances it."""
    out, position = [], 0
    for start in (m.start() for m in re.finditer(r"\[\[", text)):
        if start < position or not DROPPED_LINKS.match(text, start + 2):
            continue
        depth, index = 0, start
        while index < len(text) - 1:
            pair = text[index:index + 2]
            if pair == "[[":
                depth, index = depth + 1, index + 2
            elif pair == "]]":
                depth, index = depth - 1, index + 2
                if depth == 0:
                    break
            else:
                index += 1
        out.append(text[position:start])
        position = index if depth == 0 else len(text)
    return "".join(out) + text[position:]


def _link(match: re.Match) -> str:
    inner = match.group(1)
    if DROPPED_LINKS.match(inner):
        return ""
    target, _, label = inner.partition("|")
    label = label.rsplit("|", 1)[-1] if label else target
    return label.strip() + match.group(2)  # [[bus]]es -> buses


def clean_wikitext(text: str) -> str:
    """Plain prose from an article's wikitext, simply and deterministically:

    comments and ``<ref>``/``<math>``/``<gallery>``... elements are dropped with their content;
    templates ``{{...}}`` and tables ``{|...|}`` are dropped (nested ones too); ``[[target|label]]``
    becomes ``label``, ``[[target]]`` ``target``, and file, image, category and other-language
    links are dropped; ``[http://... label]`` becomes ``label``; bold and italic quotes and the
    remaining HTML tags go, entities are decoded; ``== Heading ==`` becomes the line ``Heading``;
    list and indent marks at the start of a line go; the article ends before its "See also",
    "References", "External links"... section; runs of blank lines become one."""
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.DOTALL)
    for name in DROPPED_ELEMENTS:
        text = re.sub(rf"<{name}\b[^>]*/>", "", text, flags=re.IGNORECASE)
        text = re.sub(rf"<{name}\b[^>]*>.*?</{name}\s*>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    text = _remove_media_links(text)
    link = re.compile(r"\[\[([^\[\]]*)\]\]([a-z]*)")
    while True:  # innermost first: links inside an image's caption, then the image
        text, count = link.subn(_link, text)
        if not count:
            break
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^<>]*>", "", text)
    text = html.unescape(text).replace("\u00a0", " ")
    lines: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in TRAILING_SECTIONS:
                break
            line = heading.group(2)
        elif line.startswith(("|", "!", "{", "}")):
            continue  # what is left of a broken table or template
        else:
            line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses emptied of their templates
        line = re.sub(r"[ \t]+", " ", line).replace(" ,", ",").replace(" .", ".")
        if line or (lines and lines[-1]):
            lines.append(line.strip())
    return "\n".join(lines).strip()


def wikipedia_articles(max_articles: int | None = None) -> list[tuple[str, str]]:
    """``(title, plain text)`` of the articles of gensim's Wikipedia dump, in dump order (those the
    cleaner leaves empty left out); ``max_articles`` limits the count."""
    articles = []
    for title, wikitext in iter_articles(wikipedia_dump()):
        if max_articles is not None and len(articles) >= max_articles:
            break
        body = clean_wikitext(wikitext)
        if body:
            articles.append((title, body))
    return articles


def wikipedia_text(max_articles: int | None = None) -> str:
    """The articles of :func:`wikipedia_articles` as one text: per article its title, a blank
    line, its text, a blank line."""
    return "\n".join(f"{title}\n\n{body}\n" for title, body in wikipedia_articles(max_articles))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m qstrat.corpus",
        description="Write the English Wikipedia articles shipped by the package gensim as plain text (for qstrat eval --text).",
    )
    parser.add_argument("output", type=Path, help="the text file to write (UTF-8)")
    parser.add_argument("--articles", type=int, default=None, help="at most this many articles (default: all)")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N articles (a calibration text apart from an evaluation text)")
    args = parser.parse_args(argv)
    try:
        articles = wikipedia_articles(None if args.articles is None else args.skip + args.articles)[args.skip:]
        text = "\n".join(f"{title}\n\n{body}\n" for title, body in articles)
        args.output.write_text(text, encoding="utf-8")
    except (InputError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {len(articles)} articles, {len(text)} characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
