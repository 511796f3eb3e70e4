"""qstrat.corpus: plain English text from the Wikipedia dump that gensim's wheel ships."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from qstrat.corpus import clean_wikitext, iter_articles, wikipedia_articles, wikipedia_dump, wikipedia_text
from qstrat.errors import InputError


def test_clean_wikitext_keeps_the_prose():
    wikitext = """{{Other uses}}
{{Infobox|name={{nested|x}}|y=1}}
[[File:Albedo.svg|thumb|A caption with a [[link]] and [brackets] in it]]
'''Albedo''' ({{IPAc-en|æ|l}}) is the [[diffuse reflection|diffuse reflectivity]] of a [[surface]]s.<ref name="a">A source {{cite web|url=x}}</ref>
It is used in [[climatology]]&nbsp;and&amp;more.<ref name="b"/> See [http://example.org the site].<!-- a comment -->

== Terrestrial albedo ==
{| class="wikitable"
|-
| Fresh asphalt || 0.04
|}
* A list item with ''italic'' text
<math>x^2</math>Formula gone; <sub>kept</sub>.
[[Category:Physics]]
[[de:Albedo]]

== See also ==
* [[Reflectance]]
"""
    assert clean_wikitext(wikitext) == (
        "Albedo is the diffuse reflectivity of a surfaces.\n"
        "It is used in climatology and&more. See the site.\n"
        "\n"
        "Terrestrial albedo\n"
        "\n"  # where the table was
        "A list item with italic text\n"
        "Formula gone; kept."
    )


def test_clean_wikitext_is_robust_to_broken_markup():
    assert clean_wikitext("Text {{unclosed template") == "Text {{unclosed template"
    assert clean_wikitext("[[File:x.png|caption [[never closed]]\nNext line.") == ""
    assert clean_wikitext("<!-- open comment\nText") == ""
    assert clean_wikitext("") == ""


def test_wikipedia_text_from_gensims_wheel():
    dump = wikipedia_dump()
    assert dump.name.startswith("enwiki-latest-pages-articles1") and dump.suffix == ".bz2"
    titles = [title for title, _ in iter_articles(dump)]
    assert titles[:3] == ["Anarchism", "Autism", "Albedo"]  # redirects (AccessibleComputing, ...) left out
    articles = wikipedia_articles(3)
    assert [title for title, _ in articles] == titles[:3]
    anarchism = articles[0][1]
    assert anarchism.startswith(
        "Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions."
    )
    text = wikipedia_text(3)
    assert len(text) > 50_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "&quot;", "&lt;", "|-"):
        assert markup not in text, markup
    assert hashlib.sha256(text.encode()).hexdigest() == hashlib.sha256(wikipedia_text(3).encode()).hexdigest()


def test_corpus_command_writes_the_text(tmp_path):
    out = tmp_path / "wiki.txt"
    result = subprocess.run([sys.executable, "-m", "qstrat.corpus", str(out), "--articles", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == wikipedia_text(2)
    assert result.stdout.startswith(f"wrote {out}: 2 articles")
    # --skip: a text that shares no article with the first (a calibration text apart from an evaluation text)
    apart = tmp_path / "calibration.txt"
    result = subprocess.run([sys.executable, "-m", "qstrat.corpus", str(apart), "--skip", "2", "--articles", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    title, body = wikipedia_articles(3)[2]
    assert apart.read_text(encoding="utf-8") == f"{title}\n\n{body}\n"
    bad = subprocess.run([sys.executable, "-m", "qstrat.corpus", str(tmp_path / "missing" / "x.txt")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_without_gensim_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(InputError, match="needs the package gensim"):
        wikipedia_dump()
