"""`anomalygpt chat`: scripted --ask, the REPL commands, and one-line errors that never end the session."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import texture_crops, with_dark_blob
from PIL import Image
from tiny_llm import save_chat_llm

from anomalygpt.assistant import ChatSession, build_assistant
from anomalygpt.config import load_preset
from chat.cli import main
from chat.terminal import Terminal


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("chat")
    llm = save_chat_llm(folder / "llm")
    preset = {
        "backbone": {"image_size": 64},
        "memory": {"augment": True},  # a brick texture: its rotations and flips are good patches too
        "llm": {"model": str(llm)},
        "assistant": {"max_new_tokens": 8},
    }
    (folder / "tiny.json").write_text(json.dumps(preset))
    images = {
        "bad": with_dark_blob(texture_crops(1, size=64, seed=98)[0], center=(46, 46), radius=7),
        "good": texture_crops(1, size=64, seed=99)[0],
        **{f"ref{i}": crop for i, crop in enumerate(texture_crops(4, size=64, seed=11))},
    }
    for name, image in images.items():
        Image.fromarray(image).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return {"preset": folder / "tiny.json", **{name: folder / f"{name}.png" for name in [*images, "broken"]}}


def refs(files: dict[str, Path]) -> list[str]:
    return [str(files[f"ref{i}"]) for i in range(4)]


def test_ask_prints_the_facts_and_each_answer(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(files["bad"]), "--ref", *refs(files), "--preset", str(files["preset"]), "--class-name", "brick"]
    code = main([*argv, "--ask", "Is there an anomaly in this image?", "--ask", "Where is it?", "--ask", "  "])
    out, err = capsys.readouterr()
    assert code == 2  # one question was refused; the others were answered
    assert "Verdict for brick: ANOMALOUS" in out and "bottom right" in out
    answers = [line for line in out.splitlines() if line.startswith("A: ")]
    assert len(answers) == 2 and "Yes: the image is anomalous" in answers[0]  # the detector said anomalous
    assert out.count("Q: ") == 2 and "Q: Where is it?" in out
    lines = err.strip().splitlines()
    assert lines[-1] == "anomalygpt chat: error: empty question: type a question about the image"
    assert "note: preset 'tiny' names no trained assistant weights" in err


def test_grounded_answers_as_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    questions = ["Where is it?", "Compare it with the good references.", "What kind of defect could it be?"]
    argv = [str(files["bad"]), "--ref", *refs(files), "--preset", str(files["preset"]), "--answerer", "grounded"]
    assert main([*argv, "--json", *(part for q in questions for part in ("--ask", q))]) == 0
    out, err = capsys.readouterr()
    record = json.loads(out)  # nothing but the one document on stdout
    assert "note: preset" not in err  # no language model was loaded
    assert record["answerer"] == "grounded" and record["image"] == str(files["bad"])
    inspection = record["inspection"]
    assert inspection["verdict"] == "anomalous" and [m["content"] for m in record["transcript"][::2]] == questions
    (found,) = record["evidence"]  # one region, matched against one of the references
    assert found["region"] == 1 and found["reference_name"] in [Path(r).name for r in refs(files)]
    compare = record["transcript"][3]["content"]
    assert f"matches reference {found['reference'] + 1} ({found['reference_name']})" in compare
    assert "bottom right" in record["transcript"][1]["content"]
    assert record["checks"] == {"answers": 3, "fired": 0, "paths": {}, "facts": {}}


def test_a_profile_gives_the_same_inspection_and_evidence_as_its_references(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from anomalygpt.cli import main as anomalygpt

    profile = tmp_path / "tiny.profile"
    assert anomalygpt(["fit", *refs(files), "--out", str(profile), "--preset", str(files["preset"])]) == 0
    capsys.readouterr()
    ask = ["--answerer", "grounded", "--json", "--ask", "Compare it with the good references."]
    assert main([str(files["bad"]), "--ref", *refs(files), "--preset", str(files["preset"]), *ask]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert main([str(files["bad"]), "--profile", str(profile), *ask]) == 0  # the profile's own preset
    saved = json.loads(capsys.readouterr().out)
    assert saved["inspection"]["score"] == direct["inspection"]["score"]
    assert saved["inspection"]["regions"] == direct["inspection"]["regions"]
    assert saved["evidence"] == direct["evidence"] and saved["transcript"] == direct["transcript"]
    assert main([str(files["bad"]), "--profile", str(profile), "--ref", *refs(files), *ask]) == 2
    assert "--profile and --ref" in capsys.readouterr().err


def test_llm_answers_as_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(files["bad"]), "--ref", *refs(files), "--preset", str(files["preset"]), "--json"]
    assert main([*argv, "--ask", "How many defects are there?"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["answerer"] == "llm" and len(record["transcript"]) == 2
    said = record["transcript"][1]
    assert "There is 1 anomalous region" in said["content"] and said["guarded"] and not said["contradicts"]
    assert set(said["checks"]) == {"sentences", "paths", "facts", "repairs", "raw"}


def test_bad_start_inputs_are_one_line(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    preset = ["--preset", str(files["preset"])]
    cases = [
        ([str(files["bad"].with_name("missing.png")), "--ref", *refs(files), *preset], "missing.png: no such file"),
        ([str(files["broken"]), "--ref", *refs(files), *preset], "broken.png: not a readable image"),
        ([str(files["bad"]), "--ref", str(files["broken"]), *preset], "broken.png: not a readable image"),
        ([str(files["bad"]), *preset], "no good reference images given"),
        ([str(files["bad"]), "--ref", *refs(files), "--preset", "nope"], "unknown preset 'nope'"),
        ([str(files["bad"]), "--sensitivity", "9"], "--sensitivity: must be a number from -5 to 5"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("anomalygpt chat: error: ") and message in last, err


def test_a_query_of_another_size_than_the_profile_is_one_line_without_advice_about_references(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from anomalygpt.cli import main as anomalygpt

    profile = tmp_path / "tiny.profile"
    assert anomalygpt(["fit", *refs(files), "--out", str(profile), "--preset", str(files["preset"])]) == 0
    small = tmp_path / "small.png"
    Image.open(files["good"]).resize((48, 48)).save(small)
    capsys.readouterr()
    assert main([str(small), "--profile", str(profile), "--answerer", "grounded", "--ask", "Is it defective?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"anomalygpt chat: error: {small}: 48x48 px but the references are 64x64 px; queries and references must "
        "have the same size"
    ]


@pytest.fixture(scope="module")
def session(files: dict[str, Path]) -> ChatSession:
    chat = ChatSession(build_assistant(load_preset(str(files["preset"]))))
    chat.set_references(refs(files), refs(files))
    return chat


def run_lines(session: ChatSession, lines: list[str]) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    assert Terminal(session, out, err).run(lines) == 0
    return out.getvalue(), err.getvalue()


def test_repl_commands_and_save(session: ChatSession, files: dict[str, Path], tmp_path: Path) -> None:
    saved = tmp_path / "sub" / "chat.json"
    lines = [
        f"/image {files['bad']}",
        "Is this part defective?",
        "How many defects do you see?",
        f"/save {saved}",
        "/reset",
        f"/image {files['good']}",
        "Do you see any defect?",
        "/help",
        "/quit",
        "Never read: the session ended.",
    ]
    out, err = run_lines(session, lines)
    assert err == ""
    assert out.count("Verdict for the product: ANOMALOUS") == 1 and out.count("NORMAL (no defect found)") == 1
    answers = [line for line in out.splitlines() if line.startswith("A: ")]
    assert len(answers) == 3 and "Yes: the image is anomalous" in answers[0] and "No: the image is normal" in answers[2]
    assert f"saved {saved}" in out and "conversation cleared" in out and "/ref PATH..." in out
    assert "Never read" not in out
    record = json.loads(saved.read_text())
    assert record["image"] == str(files["bad"]) and record["references"] == refs(files)
    assert record["inspection"]["verdict"] == "anomalous" and record["inspection"]["regions"]
    assert [m["role"] for m in record["transcript"]] == ["user", "assistant", "user", "assistant"]
    assert record["transcript"][0]["content"] == "Is this part defective?"
    assert record["transcript"][1]["guarded"] is True


def test_repl_bad_input_is_one_line_and_the_session_goes_on(
    session: ChatSession, files: dict[str, Path], tmp_path: Path
) -> None:
    lines = [
        f"/image {files['bad']}",
        "",
        "x" * 600,
        f"/image {tmp_path / 'missing.png'}",
        f"/image {files['broken']}",
        "/image",
        f"/ref {tmp_path / 'nowhere'}",
        "/save",
        f"/save {tmp_path}",  # a folder
        "/bogus",
        '/image "unclosed',
        "Is there an anomaly in this image?",
    ]
    out, err = run_lines(session, lines)
    errors = err.splitlines()
    assert len(errors) == 10 and all(line.startswith("anomalygpt chat: error: ") for line in errors)
    expected = [
        "empty question",
        "question too long: 600 characters, at most 500",
        "missing.png: no such file",
        "broken.png: not a readable image",
        "/image takes one path",
        "nowhere: no such file or folder",
        "/save takes one file name",
        str(tmp_path),
        "unknown command /bogus",
        "No closing quotation",
    ]
    for line, message in zip(errors, expected, strict=True):
        assert message in line, line
    assert session.inspection.source == str(files["bad"])  # the failed /image commands changed nothing
    assert out.splitlines()[-1].startswith("A: ") and "Yes: the image is anomalous" in out.splitlines()[-1]


def test_new_references_re_inspect_the_image(session: ChatSession, files: dict[str, Path]) -> None:
    out, err = run_lines(session, [f"/image {files['good']}", f"/ref {files['ref0']} {files['ref1']}"])
    assert err == "" and "2 good reference(s) indexed" in out
    assert session.inspection.n_references == 2 and session.reference_sources == [
        str(files["ref0"]),
        str(files["ref1"]),
    ]
    assert out.count("Verdict for the product") == 2
