"""Cleaning: HTML to visible text, unicode and whitespace normalisation, length filter, byte report."""
from nanogpt_np.data.clean import Cleaner, looks_like_html, normalize_unicode, normalize_whitespace, strip_html

PAGE = """<!DOCTYPE html>
<html><head><title>Page title</title>
<style>body { color: red; }</style>
<script type="text/javascript">var x = "<p>not text</p>"; alert(1);</script>
</head>
<body>
  <h1>Fish &amp; Chips</h1>
  <p>Served   hot,
     with <b>salt</b> &lt;and&gt; vinegar.</p>
  <!-- a comment -->
  <ul><li>one</li><li>two&nbsp;items</li></ul>
  <pre>def f():
    return 1</pre>
  <noscript>enable js</noscript>
</body></html>"""


def test_html_stripped_to_visible_text():
    text = strip_html(PAGE)
    assert text == (
        "Fish & Chips\n\nServed hot, with salt <and> vinegar.\n\none\n\ntwo\u00a0items\n\n"
        "def f():\n    return 1"
    )
    for hidden in ("color", "alert", "not text", "comment", "enable js", "Page title"):
        assert hidden not in text


def test_cleaner_auto_html_only_on_html():
    c = Cleaner()
    out, removed = c.clean(PAGE)
    assert out.startswith("Fish & Chips") and "two items" in out  # nbsp -> space by whitespace step
    assert removed["html"] > 0
    code = "if a < b and b > c:\n    print('<ok>')"
    assert not looks_like_html(code)
    assert c.clean(code)[0] == code
    assert Cleaner(html=False).clean(PAGE)[0].startswith("<!DOCTYPE html>")


def test_unicode_nfc_and_controls():
    decomposed = "cafe\u0301\r\nline\x00two\x1b"
    assert normalize_unicode(decomposed) == "caf\u00e9\nlinetwo"


def test_whitespace_keeps_indentation():
    text = "\n\n  indented   line   \t\n\n\n\nnext\u3000word\n\n"
    assert normalize_whitespace(text) == "  indented   line\n\nnext word"


def test_length_filter_and_report():
    c = Cleaner(min_chars=10)
    out, removed = c.clean("  short \n")
    assert out is None and removed["too_short"] == len("  short") and removed["whitespace"] == 2
    assert Cleaner().clean(" \n\t\n")[0] is None  # empty after cleaning is always dropped
    assert Cleaner(min_chars=10).clean("long enough text")[0] == "long enough text"


def test_line_breaking_controls_become_newlines():
    """\\v, \\f, NEL, LINE and PARAGRAPH SEPARATOR separate lines: removing them glued the words."""
    for sep in ("\x0b", "\x0c", "\x85", "\u2028", "\u2029"):
        assert normalize_unicode(f"one{sep}two") == "one\ntwo", repr(sep)
    assert normalize_unicode("a\x01b\x7fc") == "abc"  # other control characters are still removed
