"""Cleaning: HTML to visible text, unicode NFC, whitespace, and a minimum length, one document at a time.

Each step is optional (a `CleanOptions` field) and is on by default where it cannot hurt ordinary text:
  html        "auto" (default): strip tags only from documents that look like HTML (a doctype, an
              <html>/<body> tag, or several common tags); True: always; False: never.
              Stripping drops <script>, <style>, <noscript>, <template> and <title> with their
              contents and comments, decodes entities (&amp; -> &), turns block elements (p, div,
              br, li, h1..h6, tr, ...) into line breaks and collapses the other whitespace the way a
              browser does, except inside <pre>.
  unicode     NFC normalisation, \r\n, \r and the other line breaks (VT, FF, U+0085, U+2028, U+2029) to \n,
              other control characters removed (tab and newline kept).
  whitespace  unicode spaces (no-break, thin, ideographic, ...) to ' ', trailing spaces of each line
              removed, at most one blank line in a row, no blank lines at the start or end. Leading
              indentation is kept (code stays code); runs of spaces inside a line are kept.
  min_chars   documents shorter than this after cleaning are dropped (default 1: only empty ones).
What it does not do: language identification, quality filtering, boilerplate (menu/footer) removal,
or repairing mojibake.

`Cleaner.clean(text)` returns the cleaned text (or None when dropped) and the bytes each step removed,
so a report can say how much every step took out.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Dict, Optional, Tuple, Union

SKIP_TAGS = {"script", "style", "noscript", "template", "title"}
BLOCK_TAGS = {
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption", "figure",
    "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol",
    "p", "pre", "section", "table", "tr", "ul", "caption", "details", "summary",
}
_HTML_STRONG = re.compile(r"<!doctype\s+html|<html[\s>]|<body[\s>]", re.IGNORECASE)
_HTML_TAG = re.compile(
    r"</?(?:p|div|span|br|a|script|style|h[1-6]|ul|ol|li|table|tr|td|th|img|meta|link|b|i|em|strong|pre|"
    r"code|head|title|section|article|nav|footer|header|form|input|button)(?:\s[^<>]*)?/?>",
    re.IGNORECASE,
)
_SPACES = re.compile(r"[ \t\n\r\f\v]+")
_UNICODE_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_LINE_BREAKS = re.compile("[\x0b\x0c\x85\u2028\u2029]")  # vertical tab, form feed, NEL, line/paragraph separator
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_MANY_NEWLINES = re.compile(r"\n{3,}")


def looks_like_html(text: str) -> bool:
    """A doctype/<html>/<body>, or at least 3 common tags."""
    if _HTML_STRONG.search(text):
        return True
    count = 0
    for _ in _HTML_TAG.finditer(text):
        count += 1
        if count >= 3:
            return True
    return False


class _VisibleText(HTMLParser):
    """Collects the text a browser would show (see strip_html)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)  # entities are decoded before handle_data sees them
        self.parts = []
        self.skip_depth = 0  # > 0 inside script/style/...
        self.pre_depth = 0  # > 0 inside <pre>: whitespace is kept as is

    def handle_starttag(self, tag, attrs):
        if tag in SKIP_TAGS:
            self.skip_depth += 1
        elif tag == "pre":
            self.pre_depth += 1
        if tag in BLOCK_TAGS:
            self._newline()

    def handle_startendtag(self, tag, attrs):  # <br/>, <hr/>
        if tag in BLOCK_TAGS:
            self._newline()

    def handle_endtag(self, tag):
        if tag in SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in BLOCK_TAGS:
            self._newline()

    def _newline(self):  # a line break from a tag: no spaces left hanging before it
        if self.parts and not self.pre_depth:
            self.parts[-1] = self.parts[-1].rstrip(" ")
        self.parts.append("\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if self.pre_depth:
            self.parts.append(data)
            return
        data = _SPACES.sub(" ", data)
        if not self.parts or self.parts[-1].endswith("\n"):
            data = data.lstrip(" ")  # no spaces at the start of a line
        if data:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """The visible text of an HTML document or fragment (entities decoded, block elements -> lines)."""
    parser = _VisibleText()
    parser.feed(text)
    parser.close()
    out = "".join(parser.parts)
    return _MANY_NEWLINES.sub("\n\n", out).strip()


def normalize_unicode(text: str) -> str:
    """NFC, \r\n / \r and the other line breaks -> \n, control characters (other than tab and newline) removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _LINE_BREAKS.sub("\n", text)  # they separate lines: deleting them would glue two words together
    text = _CONTROL.sub("", text)
    return unicodedata.normalize("NFC", text)


def normalize_whitespace(text: str) -> str:
    """Unicode spaces -> ' ', no trailing spaces, at most one blank line, no blank lines at the ends."""
    text = _UNICODE_SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip("\n")


@dataclass
class CleanOptions:
    html: Union[str, bool] = "auto"
    unicode: bool = True
    whitespace: bool = True
    min_chars: int = 1


STEPS = ("html", "unicode", "whitespace", "too_short")


class Cleaner:
    """Applies the enabled steps in order; see the module docstring."""

    def __init__(self, options: Optional[CleanOptions] = None, **kw):
        self.options = options or CleanOptions(**kw)
        if self.options.html not in ("auto", True, False):
            raise ValueError(f"html must be 'auto', True or False, got {self.options.html!r}")

    def clean(self, text: str) -> Tuple[Optional[str], Dict[str, int]]:
        """(cleaned text or None if dropped, {step: UTF-8 bytes removed}); "too_short" holds the
        size of a dropped document."""
        o = self.options
        removed: Dict[str, int] = {}
        size = len(text.encode("utf-8"))

        def step(name: str, new: str) -> str:
            nonlocal size
            new_size = len(new.encode("utf-8"))
            if new_size != size:
                removed[name] = size - new_size
                size = new_size
            return new

        if o.html is True or (o.html == "auto" and looks_like_html(text)):
            text = step("html", strip_html(text))
        if o.unicode:
            text = step("unicode", normalize_unicode(text))
        if o.whitespace:
            text = step("whitespace", normalize_whitespace(text))
        if len(text) < max(o.min_chars, 1) or not text.strip():
            removed["too_short"] = size
            return None, removed
        return text, removed
