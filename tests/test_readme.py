"""The README's measured tables equal what their files say (metrics/*.json, bench/results/*.json)."""

from __future__ import annotations

from bench import readme


def test_readme_tables_match_their_files():
    text = readme.README.read_text()
    blocks = [m.group("name") for m in readme.BLOCK.finditer(text)]
    assert {"cpu-default", "route-latency"} <= set(blocks), blocks
    assert readme.stale_blocks(text) == [], "run `python -m bench.readme` and commit README.md"


def test_a_changed_number_is_caught():
    text = readme.render(readme.README.read_text())
    # the first block with a figure in it (a block whose file is missing says so, without digits)
    m = next(m for m in readme.BLOCK.finditer(text) if any(c.isdigit() for c in m.group("body")))
    body = m.group("body")
    digit = next(i for i, c in enumerate(body) if c.isdigit())
    bad = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:]
    tampered = text[: m.start("body")] + bad + text[m.end("body"):]
    assert readme.stale_blocks(tampered) == [m.group("name")]
