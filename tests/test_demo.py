import json

from chat.demo import main


def test_demo_inspects_real_elpv_cells_and_writes_overlays(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--per-class", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "threshold" in printed and "from the references alone" in printed
    summary = json.loads((out / "summary.json").read_text())
    records = summary["records"]
    assert [r["label"] for r in records] == ["good", "defective"]
    assert len(summary["references"]) == 4
    for record in records:
        stem = record["source"].removesuffix(".png")
        assert (out / f"{stem}_overlay.png").stat().st_size > 1000
        assert record["verdict"] in printed
    # No reference is ever inspected as a query.
    assert not {r["source"] for r in records} & {p.rsplit("/", 1)[-1] for p in summary["references"]}


def test_demo_rejects_out_of_range_options(tmp_path, capsys):
    assert main(["--per-class", "0", "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err == "anomalygpt demo: error: --per-class must be from 1 to 50\n"
    assert not (tmp_path / "d").exists()
