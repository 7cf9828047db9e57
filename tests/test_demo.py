import json

from chat import demo
from chat.demo import main


class ScriptedAnswerer:
    """Records what the demo asks and streams a fixed answer in two pieces."""

    def __init__(self):
        self.calls = []

    def stream(self, question, history, inspection, image, evidence=None, on_report=None):
        self.calls.append((question, list(history), inspection, image.shape))
        yield f"Answer {len(self.calls)} "
        yield f"about {inspection.source}."


def test_demo_inspects_real_elpv_cells_and_writes_overlays(tmp_path, capsys, monkeypatch):
    answerer = ScriptedAnswerer()
    chosen = []
    monkeypatch.setattr(demo, "load_answerer", lambda preset, choice, inspector: chosen.append(choice) or answerer)
    out = tmp_path / "demo"
    assert main(["--per-class", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "threshold" in printed and "from the references alone" in printed
    summary = json.loads((out / "summary.json").read_text())
    records = summary["records"]
    assert [r["label"] for r in records] == ["good", "defective"] and summary["demo"] is True
    assert all(len(r["source_sha256"]) == 64 for r in records)  # the bytes inspected
    assert len(summary["references"]) == demo.DEMO_REFERENCES == 64
    for record in records:
        stem = record["source"].removesuffix(".png")
        assert (out / f"{stem}_overlay.png").stat().st_size > 1000
        assert record["verdict"] in printed
    # No reference is ever inspected as a query.
    assert not {r["source"] for r in records} & {p.rsplit("/", 1)[-1] for p in summary["references"]}
    # The scripted chat: both questions about the flagged cell, streamed, the second one with the first turn.
    flagged = next(r for r in records if r["is_anomalous"])
    assert chosen == ["auto"] and [call[0] for call in answerer.calls] == list(demo.DEMO_QUESTIONS)
    assert all(call[2].source == flagged["source"] and call[3] == (300, 300, 3) for call in answerer.calls)
    first_answer = f"Answer 1 about {flagged['source']}."
    assert answerer.calls[0][1] == [] and answerer.calls[1][1] == [(demo.DEMO_QUESTIONS[0], first_answer)]
    assert f"  assistant: {first_answer}\n" in printed and "(LLM assistant, grounded in the inspection)" in printed
    # Only the development half: odd-numbered cells, references and queries alike.
    numbers = [int(name.rsplit("/", 1)[-1][4:8]) for name in [*summary["references"], *(r["source"] for r in records)]]
    assert all(number % 2 == 1 for number in numbers)
    chat = json.loads((out / "chat.json").read_text())
    assert chat["image"] == flagged["source"] and [t["question"] for t in chat["transcript"]] == list(
        demo.DEMO_QUESTIONS
    )
    assert chat["transcript"][1]["answer"] == f"Answer 2 about {flagged['source']}."


def test_demo_grounded_chat_answers_from_the_inspection(tmp_path, capsys):
    assert main(["--per-class", "1", "--answerer", "grounded", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "(template answers, grounded in the inspection)" in printed
    assert "Yes: the image is anomalous" in printed  # the flagged cell's verdict, first question
    chat = json.loads((tmp_path / "demo" / "chat.json").read_text())
    assert "reference" in chat["transcript"][2]["answer"] and chat["evidence"]  # compared with a good cell
    assert all(check["paths"] == {} for check in chat["checks"])  # grounded answers need no repair
    # A cell unlike the references is named, with why, before the table shows its 'fit: NO'.
    records = json.loads((tmp_path / "demo" / "summary.json").read_text())["records"]
    unfit = [r["source"] for r in records if r["reference_fit"]["fits"] is False]
    assert unfit and all(
        0 <= printed.find(f"warning: {source}: the image does not look like") < printed.index("\nfile ")
        for source in unfit
    )


def test_demo_rejects_out_of_range_options(tmp_path, capsys):
    assert main(["--per-class", "0", "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err == "anomalygpt demo: error: --per-class must be from 1 to 50\n"
    for wrong in ("0", "257"):
        assert main(["--references", wrong, "--out", str(tmp_path / "d")]) == 2
        assert capsys.readouterr().err == "anomalygpt demo: error: --references must be from 1 to 256\n"
    assert not (tmp_path / "d").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")  # a folder of something else is not the demo's to rewrite
    assert main(["--out", str(other)]) == 2
    assert "--out holds files of something else" in capsys.readouterr().err
    assert [path.name for path in other.iterdir()] == ["notes.txt"]


def test_demo_names_an_answerer_that_cannot_load_in_one_line(tmp_path, capsys, monkeypatch):
    def unavailable(preset, choice, inspector):
        raise demo.AnswererError("the LLM assistant is not available: no LLM file at /nowhere")

    monkeypatch.setattr(demo, "load_answerer", unavailable)
    assert main(["--per-class", "1", "--answerer", "assistant", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert err == "anomalygpt demo: error: the LLM assistant is not available: no LLM file at /nowhere\n"


def test_the_demo_rewrites_only_a_folder_of_its_own(tmp_path):
    assert demo.demo_folder(tmp_path / "new") and demo.demo_folder(tmp_path)  # new, or empty
    (tmp_path / "summary.json").write_text(json.dumps({"demo": True, "references": [], "records": []}))
    (tmp_path / "a_overlay.png").write_bytes(b"x")
    assert demo.demo_folder(tmp_path)  # a demo's own (make demo runs again)
    (tmp_path / "summary.json").write_text(json.dumps({"references": [], "records": []}))
    assert demo.demo_folder(tmp_path)  # written before the mark
    (tmp_path / "summary.json").write_text(json.dumps({"images": [], "n_images": 0}))
    assert not demo.demo_folder(tmp_path)  # detect's
    (tmp_path / "summary.json").unlink()
    assert not demo.demo_folder(tmp_path) and not demo.demo_folder(tmp_path / "a_overlay.png")
