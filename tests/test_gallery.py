"""runtime/outputs/gallery.py: the run's overlays on one page, highest score first."""
from runtime.outputs.gallery import write_gallery
from runtime.outputs.summary import COLUMNS


def _row(image, stem, score, label="", prompt="", status="ok", error=""):
    values = dict.fromkeys(COLUMNS, "")
    values.update(image=image, outputs=stem, status=status, image_score=score, label=label, top_prompt=prompt,
                  top_score="0.5" if prompt else "", error=error)
    return values


def test_cards_run_from_the_highest_score_and_names_are_escaped(tmp_path):
    rows = [_row("low.png", "low", "0.1", "OK"), _row("<b>odd & part</b>.png", "odd part#1", "0.9", "NG", "black hole"),
            _row("mid.png", "mid", "0.5"), _row("bad.png", "bad", "", status="failed", error="bad.png: empty file")]
    page = write_gallery(tmp_path, rows, "SAA+ anomaly maps: <mtd>").read_text()
    order = [page.index(f'src="{name}_overlay.png"') for name in ("odd%20part%231", "mid", "low")]
    assert order == sorted(order)  # 0.9, 0.5, 0.1
    assert "&lt;b&gt;odd &amp; part&lt;/b&gt;.png" in page and "<b>odd" not in page and "&lt;mtd&gt;" in page
    assert 'class="card NG"' in page and 'class="card OK"' in page and "black hole (0.5)" in page
    assert "1 failed" in page and "bad.png: empty file" in page and page.count("<img ") == 3
    assert "bad.png: bad.png" not in page  # the error names the file already
    assert write_gallery(tmp_path, [], "empty").read_text().count("<img ") == 0


def test_a_long_run_shows_its_highest_parts_and_says_how_many_there_were(tmp_path, monkeypatch):
    from runtime.outputs import gallery

    monkeypatch.setattr(gallery, "MAX_CARDS", 2)
    rows = [_row(f"{i}.png", str(i), str(i / 10)) for i in range(5)]
    page = write_gallery(tmp_path, rows, "watch", counts={"ok": 1234, "failed": 0}).read_text()
    assert page.count("<img ") == 2 and 'src="4_overlay.png"' in page and 'src="3_overlay.png"' in page
    assert "1234 parts, the 2 highest shown" in page
