"""Tests for chat/web.py: the handlers' error messages without a browser, then the page end to end in Chromium."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import gradio as gr
import numpy as np
import pytest
import skimage.data
from PIL import Image

from anomalygpt.answerers import GroundedAnswerer, grounded_answer
from anomalygpt.config import load_preset
from anomalygpt.inspection import MAX_REFERENCES, Inspection, Inspector, build_inspector
from anomalygpt.io import load_image
from anomalygpt.profile import ProfileError
from anomalygpt.verdict import few_references_note
from anomalygpt.visualize import inspection_figure
from chat.web import (
    MAX_UPLOAD_MB,
    STALE_MARK,
    Screen,
    Session,
    WebApp,
    badge_html,
    build_blocks,
    build_parser,
    inspection_status,
    loaded_app,
    main,
    serve,
)

SIDE = 64
REFERENCE_CROPS = ((0, 0), (0, 256))  # (row, col) of skimage's grass texture, as in test_cli
BAD_CROP = (200, 300)
BLOB_CENTRE, BLOB_RADIUS, BLOB_GREY = (20, 32), 12, 20  # (x, y) px: the left third, middle row
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parent.parent / "artifacts" / "web" / "app.png"
FIRST_QUESTION = "Is there an anomaly in this image?"
SECOND_QUESTION = "Where is the anomaly?"
# gradio's own queue code trips pandas 3 deprecations; nothing here can change that.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@dataclass(frozen=True)
class Scene:
    refs: list[Path]
    bad: Path  # a grass crop with a dark blob
    narrow: Path  # a reference crop 48 px wide
    corrupt: Path  # PNG signature, then garbage
    preset: Path


def crop(row: int, col: int, width: int = SIDE) -> np.ndarray:
    return np.ascontiguousarray(skimage.data.grass()[row : row + SIDE, col : col + width])


def save(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    root = tmp_path_factory.mktemp("web")
    refs = [save(root / f"ref{i}.png", crop(*rc)) for i, rc in enumerate(REFERENCE_CROPS)]
    bad = crop(*BAD_CROP)
    cv2.circle(bad, BLOB_CENTRE, BLOB_RADIUS, BLOB_GREY, thickness=-1)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    preset = root / "preset.json"
    # Small input and no rotation views keep every inspection to a few milliseconds.
    preset.write_text(
        json.dumps(
            {"name": "t", "backbone": {"name": "efficientnet-lite0", "image_size": SIDE}, "memory": {"augment": False}}
        )
    )
    return Scene(refs, save(root / "bad.png", bad), save(root / "narrow.png", crop(0, 0, 48)), corrupt, preset)


class CountingInspector:
    """The app's inspector, counting the calls that encode images."""

    def __init__(self, inspector: Inspector) -> None:
        self.inner, self.prior, self.fits, self.inspections = inspector, inspector.prior, 0, 0

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        self.fits += 1
        return self.inner.fit(*args, **kwargs)

    def inspect(self, *args: Any, **kwargs: Any) -> Inspection:
        self.inspections += 1
        return self.inner.inspect(*args, **kwargs)


@pytest.fixture(scope="module")
def inspector(scene: Scene) -> Inspector:
    return build_inspector(load_preset(str(scene.preset)))


@pytest.fixture()
def counting(inspector: Inspector) -> CountingInspector:
    return CountingInspector(inspector)


@pytest.fixture()
def app(counting: CountingInspector) -> WebApp:
    return WebApp(counting, GroundedAnswerer(), "t")  # type: ignore[arg-type]


def expected_inspection(inspector: Inspector, scene: Scene, sensitivity: float = 0.0) -> Inspection:
    """What the detector says about the bad crop, computed here without the app."""
    references = inspector.fit([load_image(path) for path in scene.refs])
    return inspector.inspect(load_image(scene.bad), references, source=scene.bad.name, sensitivity=sensitivity)


def loaded(app: WebApp, scene: Scene) -> Session:
    session = app.load_query(Session(), str(scene.bad)).session
    return app.add_references(session, [str(path) for path in scene.refs]).session


def chat(app: WebApp, session: Session, question: str, sensitivity: float = 0.0) -> list[Screen]:
    return list(app.ask(session, question, "", sensitivity))


def assert_message(screen: Screen, *parts: str) -> None:
    """The status box says what went wrong, in one line, without a traceback."""
    assert isinstance(screen.status, str) and "**Error:**" in screen.status
    text = screen.status.replace("\\", "")  # markdown escapes
    assert all(part in text for part in parts), text
    assert "Traceback" not in text and 'File "' not in text


@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request is a warnings.warn
def test_a_corrupt_upload_is_a_message_and_loads_nothing(app: WebApp, scene: Scene) -> None:
    screen = app.load_query(Session(), str(scene.corrupt))
    assert_message(screen, "corrupt.png: not a readable image")
    assert screen.session.query is None
    screen = app.add_references(Session(), [str(scene.corrupt), str(scene.refs[0])])
    assert_message(screen, "corrupt.png: not a readable image", "1 good reference(s)")
    assert [picture.name for picture in screen.session.references] == ["ref0.png"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mismatched_sizes_are_messages_naming_the_files(app: WebApp, scene: Scene) -> None:
    screen = app.add_references(Session(), [str(scene.refs[0]), str(scene.narrow), str(scene.refs[1])])
    assert_message(screen, "narrow.png: 48x64 px but ref0.png is 64x64 px; all references must have one size")
    assert [picture.name for picture in screen.session.references] == ["ref0.png", "ref1.png"]
    session = app.load_query(Session(), str(scene.narrow)).session
    session = app.add_references(session, [str(path) for path in scene.refs]).session
    assert_message(app.inspect(session, "", 0.0), "narrow.png: 48x64 px but the references are 64x64 px")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_missing_inputs_are_messages(app: WebApp, scene: Scene, counting: CountingInspector) -> None:
    assert_message(app.inspect(Session(), "", 0.0), "upload a query image first")
    no_references = app.load_query(Session(), str(scene.bad)).session
    assert_message(app.inspect(no_references, "", 0.0), f"add 1 to {MAX_REFERENCES} good reference images")
    (screen,) = chat(app, no_references, "Is it defective?")
    assert_message(screen, f"add 1 to {MAX_REFERENCES} good reference images")
    assert screen.chat == gr.skip() and no_references.history == []
    assert_message(chat(app, loaded(app, scene), "   ")[-1], "type a question first")
    assert counting.fits == counting.inspections == 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_unexpected_failure_is_a_message_not_a_traceback(app: WebApp, scene: Scene) -> None:
    class Broken:
        def stream(self, *args: Any) -> Iterator[str]:
            yield "Yes"
            raise RuntimeError("boom")

    app.answerer = Broken()
    session = loaded(app, scene)
    screens = chat(app, session, FIRST_QUESTION)
    expected = "Yes [no answer: something went wrong (RuntimeError: boom); details are in the server log]"
    assert screens[-1].chat[-1] == {"role": "assistant", "content": expected}
    assert session.history == [(FIRST_QUESTION, expected)]


def test_clearing_the_chat_stops_an_answer_being_streamed(app: WebApp, scene: Scene) -> None:
    session = loaded(app, scene)
    screens = app.ask(session, "What does the anomaly look like?", "", 0.0)
    next(screens), next(screens)  # the question, then the first piece of the answer
    app.clear_chat(session)
    assert list(screens) == [] and session.history == []


def test_chat_inspects_once_and_answers_from_the_inspection(
    app: WebApp, scene: Scene, inspector: Inspector, counting: CountingInspector
) -> None:
    expected = expected_inspection(inspector, scene)
    session = loaded(app, scene)
    asked, *answered = chat(app, session, FIRST_QUESTION)
    assert asked.question == "" and asked.chat[-1] == {"role": "assistant", "content": ""}
    assert "Verdict" in asked.status and asked.overlay == gr.skip()  # drawn by show_results, after the answer
    assert len(answered) > 2  # streamed: the answer grows over several screens
    assert app.show_results(session).badge == badge_html(expected) and app.show_results(session).badge == gr.skip()
    answer = answered[-1].chat[-1]["content"]
    assert answer == grounded_answer(FIRST_QUESTION, expected)
    assert answer.startswith("Yes" if expected.is_anomalous else "No")
    chat(app, session, SECOND_QUESTION)
    assert [turn[0] for turn in session.history] == [FIRST_QUESTION, SECOND_QUESTION]
    assert (counting.fits, counting.inspections) == (1, 1)  # the second question reused the inspection
    assert session.inspection is not None and session.inspection.to_dict() | {"timings_ms": {}} == (
        expected.to_dict() | {"timings_ms": {}}
    )


class RecordingAnswerer(GroundedAnswerer):
    """The grounded answerer, recording the history and evidence each question was answered with."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[list[tuple[str, str]], Any]] = []

    def stream(self, question, history, inspection, image, evidence=None, on_report=None):  # type: ignore[no-untyped-def]
        self.seen.append((list(history), evidence))
        yield from super().stream(question, history, inspection, image, evidence, on_report)


def test_answers_before_a_verdict_change_are_marked_stale_and_not_built_on(
    counting: CountingInspector, scene: Scene, inspector: Inspector
) -> None:
    answerer = RecordingAnswerer()
    app = WebApp(counting, answerer, "t")  # type: ignore[arg-type]
    session = loaded(app, scene)
    chat(app, session, FIRST_QUESTION)
    *_, last = chat(app, session, SECOND_QUESTION)
    assert "claim checker: no contradiction in 2 answers" in last.status.replace("\\", "")
    expected = expected_inspection(inspector, scene)
    sensitivity = round(float(np.clip(-expected.margin + (-1.0 if expected.is_anomalous else 1.0), -5, 5)), 1)
    moved = app.set_sensitivity(session, sensitivity)
    assert session.inspection is not None and session.inspection.verdict != expected.verdict
    assert "marked stale" in moved.status and session.stale_turns == 2
    answers = [message["content"] for message in moved.chat if message["role"] == "assistant"]
    assert all(answer.startswith(STALE_MARK) for answer in answers)
    *_, after = chat(app, session, FIRST_QUESTION)
    answers = [message["content"] for message in after.chat if message["role"] == "assistant"]
    assert [answer.startswith(STALE_MARK) for answer in answers] == [True, True, False]
    assert answerer.seen[-1][0] == []  # the stale answers are not the new answer's history
    assert answers[-1] == grounded_answer(FIRST_QUESTION, session.inspection, answerer.seen[-1][1])


def test_each_region_is_shown_beside_its_best_good_match(app: WebApp, scene: Scene) -> None:
    session = loaded(app, scene)
    screen = app.inspect(session, "", 0.0)
    assert session.inspection is not None and session.inspection.regions
    assert len(screen.evidence) == len(session.inspection.regions)
    image, caption = screen.evidence[0]
    assert image.shape == (192, 2 * 192 + 8, 3)
    assert caption.startswith(f"region 1 ({session.inspection.regions[0].where()}) | reference ")
    assert any(f": {path.name} (" in caption for path in scene.refs)


def test_one_or_few_references_get_a_note_in_the_status(app: WebApp, scene: Scene) -> None:
    from anomalygpt.verdict import ONE_REFERENCE_CAVEAT

    one = app.load_query(Session(), str(scene.bad)).session
    one = app.add_references(one, [str(scene.refs[0])]).session
    status = app.inspect(one, "", 0.0).status
    assert "Verdict" in status and ONE_REFERENCE_CAVEAT in status and "Note:" not in status
    status = app.inspect(loaded(app, scene), "", 0.0).status.replace("\\", "")  # markdown escapes
    assert ONE_REFERENCE_CAVEAT not in status  # two references: the note on few references instead, after the verdict
    assert status.index("Verdict") < status.index(f"Note: {few_references_note(2)}.")


def test_a_conformal_p_value_follows_the_verdict_in_the_status(app: WebApp, scene: Scene) -> None:
    session = loaded(app, scene)
    app.inspect(session, "", 0.0)
    assert session.inspection is not None and "p = " not in inspection_status(session)  # 2 references: none
    conformal = {**session.inspection.calibration, "false_alarm_rate": 0.02}
    session.inspection = replace(session.inspection, p_value=0.012, calibration=conformal)
    status = inspection_status(session).replace("\\", "")
    said = (
        "It is set so that good parts like the references score above it at most 2.0% of the time. "
        "Good parts like the references score this high about 1.2% of the time (p = 0.012)."
    )
    assert status.index("Verdict") < status.index(said)  # the chat's own sentences


def test_a_query_unlike_the_references_is_warned_before_the_verdict(app: WebApp, scene: Scene, tmp_path: Path) -> None:
    brick = np.ascontiguousarray(skimage.data.brick()[:SIDE, :SIDE])  # another product of the same size
    session = app.load_query(Session(), str(save(tmp_path / "brick.png", brick))).session
    session = app.add_references(session, [str(path) for path in scene.refs]).session
    status = app.inspect(session, "", 0.0).status
    assert session.inspection is not None and session.inspection.reference_fit["fits"] is False
    assert status.startswith("**Warning:** the image does not look like the good references")
    assert "references do not fit" in badge_html(session.inspection)
    assert "Warning" not in app.inspect(loaded(app, scene), "", 0.0).status  # a grass query fits


def test_sensitivity_redecides_without_encoding(
    app: WebApp, scene: Scene, inspector: Inspector, counting: CountingInspector
) -> None:
    session = loaded(app, scene)
    app.inspect(session, "", 0.0)
    for sensitivity in (-2.5, 0.7, 3.0, 0.0):
        screen = app.set_sensitivity(session, sensitivity)
        expected = expected_inspection(inspector, scene, sensitivity)
        got = screen.session.inspection
        assert got is not None and got.verdict == expected.verdict
        assert (got.threshold, got.margin) == pytest.approx((expected.threshold, expected.margin))
        assert got.regions == expected.regions and f'data-verdict="{expected.verdict}"' in screen.badge
        assert len(screen.table) == len(expected.regions)
    assert (counting.fits, counting.inspections) == (1, 1)


def test_downloads_hold_the_inspection_and_its_figure(app: WebApp, scene: Scene, inspector: Inspector) -> None:
    session = loaded(app, scene)
    screen = app.inspect(session, "grass", 1.5)
    assert screen.json_file.value["orig_name"] == "bad_inspection.json"
    assert screen.png_file.value["orig_name"] == "bad_overlay.png"
    files = session.exported
    assert files is not None
    record = json.loads(files.json_path.read_text())
    expected = inspector.inspect(
        load_image(scene.bad),
        inspector.fit([load_image(path) for path in scene.refs], "grass"),
        class_name="grass",
        source="bad.png",
        sensitivity=1.5,
    )
    assert record["verdict"] == expected.verdict and record["threshold"] == pytest.approx(expected.threshold)
    assert record["sensitivity"] == 1.5 and record["references"] == ["ref0.png", "ref1.png"]
    assert record["class_name"] == "grass" and record["preset"] == "t"
    png = load_image(files.png_path)
    assert png.shape == inspection_figure(load_image(scene.bad), expected).shape
    folder = session.folder
    assert folder is not None and folder.is_dir()
    session.close()
    assert not folder.exists()


def test_two_sessions_are_independent(app: WebApp, scene: Scene) -> None:
    first, second = loaded(app, scene), Session()
    app.inspect(first, "", 0.0)
    app.set_sensitivity(second, 3.0)
    assert first.inspection is not None and second.inspection is None and first.sensitivity == 0.0


def test_main_reports_a_taken_port_in_one_line(scene: Scene) -> None:
    err = io.StringIO()
    with socket.socket() as taken, contextlib.redirect_stderr(err):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--preset", str(scene.preset), "--port", str(port), "--answerer", "grounded"]) == 2
    assert err.getvalue() == (
        f"anomalygpt ui: error: --host/--port: cannot listen on 127.0.0.1:{port} "
        f"(Cannot find empty port in range: {port}-{port}); is the port taken?\n"
    )


def test_main_rejects_bad_options_in_one_line(scene: Scene) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["--port", "0"]) == 2
        assert main(["--host", "0.0.0.0", "--preset", str(scene.preset.with_name("missing.json"))]) == 2
    lines = err.getvalue().splitlines()
    assert (build_parser().parse_args([]).host, build_parser().parse_args([]).port) == ("127.0.0.1", 7860)
    assert lines[0] == "anomalygpt ui: error: --port: must be from 1 to 65535, got 0"
    assert lines[1].startswith("anomalygpt ui: warning: --host 0.0.0.0 lets other machines reach this app")
    assert lines[2].startswith("anomalygpt ui: error: preset file not found:") and len(lines) == 3


def test_a_profile_loads_with_its_own_preset_unless_another_is_given(
    scene: Scene, inspector: Inspector, tmp_path: Path
) -> None:
    profile = inspector.save_profile(inspector.fit(scene.refs), tmp_path / "t.profile", scene.refs)
    app = loaded_app(build_parser().parse_args(["--profile", str(profile), "--answerer", "grounded"]))
    assert app.preset_name == "t" and app.inspector.preset.backbone.image_size == SIDE
    assert app.profile is not None and app.profile.names == [str(path) for path in scene.refs]
    with pytest.raises(ProfileError, match="fitted with preset 't', whose backbone.* differ from preset 'default'"):
        loaded_app(build_parser().parse_args(["--profile", str(profile), "--preset", "default"]))


def test_a_profile_tab_needs_no_references_and_compares_with_the_profile_s_files(
    scene: Scene, inspector: Inspector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    product, elsewhere = tmp_path / "product", tmp_path / "elsewhere"
    product.mkdir(), elsewhere.mkdir()
    for path in scene.refs:
        (product / path.name).write_bytes(path.read_bytes())
    monkeypatch.chdir(product)  # fitted as `anomalygpt fit ref0.png ref1.png --out t.profile` in the product's folder
    names = [path.name for path in scene.refs]
    profile = inspector.save_profile(inspector.fit(names), product / "t.profile", names)
    monkeypatch.chdir(elsewhere)  # `ui --profile ../product/t.profile`: the files are found beside the profile
    app = loaded_app(build_parser().parse_args(["--profile", str(profile), "--answerer", "grounded"]))
    upload = elsewhere / "bad.png"
    upload.write_bytes(scene.bad.read_bytes())
    loaded = app.load_query(Session(), str(upload))
    assert "add good reference" not in loaded.status
    assert "against the profile's 2 good references unless you add your own" in loaded.status
    screens = list(app.ask(loaded.session, "Compare it with the good references.", "", 0.0))
    answer = screens[-1].session.history[-1][1]
    assert answer.startswith("Compared with the 2 good references, 1 anomalous region differs from them.")
    assert "best matches reference" in answer and "(ref" in answer  # the good crop's file, not only the region


# The page end to end ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture()
def page_url(app: WebApp) -> Iterator[str]:
    blocks = build_blocks(app)
    port = free_port()
    serve(blocks, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        blocks.close()


def bot_messages(page: Any) -> list[str]:
    return page.eval_on_selector_all("#chat [data-testid=bot]", "els => els.map(e => e.innerText.trim())")


def table_rows(page: Any) -> list[list[str]]:
    return page.eval_on_selector_all(
        "#regions .virtual-row",
        "rows => rows.map(r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()))",
    )


def wait_until(condition: Any, what: str, timeout: float = 20.0) -> None:
    """Poll a Python condition about the page (the page updates asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def ask(page: Any, question: str, expected: str) -> None:
    count = len(bot_messages(page))
    page.fill("#question textarea", question)
    page.press("#question textarea", "Enter")
    wait_until(lambda: bot_messages(page)[count:] == [expected], f"the answer to {question!r}")


def shows(page: Any, inspection: Inspection) -> bool:
    """The badge, the numbers beside it and the region table show this inspection."""
    badge = page.query_selector("#verdict [data-verdict]")
    rows = table_rows(page)
    return (
        badge is not None
        and badge.get_attribute("data-verdict") == inspection.verdict
        and f"threshold {inspection.threshold:.4f}" in badge.inner_text()
        and [row[1] for row in rows] == [region.where() for region in inspection.regions]
    )


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (`make install` installs it with apt-get)")
def test_the_page_inspects_chats_and_tunes_sensitivity(
    page_url: str, scene: Scene, inspector: Inspector, counting: CountingInspector
) -> None:
    from playwright.sync_api import sync_playwright

    expected = expected_inspection(inspector, scene)
    # Move the verdict across the threshold: the margin grows by exactly the sensitivity.
    sensitivity = round(float(np.clip(-expected.margin + (-1.0 if expected.is_anomalous else 1.0), -5, 5)), 1)
    moved = expected_inspection(inspector, scene, sensitivity)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
            page.goto(page_url)
            page.wait_for_selector("#question textarea")
            page.set_input_files("#query input[type=file]", str(scene.bad))
            page.wait_for_function("document.querySelector('#status').innerText.includes('Query bad.png loaded')")
            page.set_input_files("input[type=file][multiple]", [str(path) for path in scene.refs])
            page.wait_for_function("document.querySelector('#status').innerText.includes('2 good reference(s)')")
            assert page.eval_on_selector_all("#references img", "els => els.length") == 2

            ask(page, FIRST_QUESTION, grounded_answer(FIRST_QUESTION, expected))
            assert bot_messages(page)[0].startswith("Yes" if expected.is_anomalous else "No")
            wait_until(lambda: shows(page, expected), "the verdict badge and region table")
            assert page.text_content("#verdict .verdict-word") == expected.verdict
            figure = inspection_figure(load_image(scene.bad), expected)
            overlay = page.eval_on_selector("#overlay img", "img => [img.naturalHeight, img.naturalWidth]")
            assert overlay == list(figure.shape[:2])
            ask(page, SECOND_QUESTION, grounded_answer(SECOND_QUESTION, expected))
            page.wait_for_selector("#overlay img", state="visible")
            regions = len(expected.regions)
            assert page.eval_on_selector_all("#evidence img", "els => els.length") == regions
            # The region table is not cut off: every row is in view and no cell's text is clipped.
            assert page.eval_on_selector_all("#regions tbody tr", "rows => rows.length") == regions
            # (gradio also renders a hidden copy of the rows, unwrapped, to measure columns: not what a user sees)
            shown = "c.checkVisibility({visibilityProperty: true, opacityProperty: true})"
            clipped = f"cells => cells.filter(c => {shown} && c.scrollWidth > c.clientWidth + 1).length"
            assert page.eval_on_selector_all("#regions tbody td", clipped) == 0
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            with page.expect_download() as download:
                page.click("#download-json")
            record = json.loads(Path(download.value.path()).read_text())
            assert record["verdict"] == expected.verdict and len(record["regions"]) == len(expected.regions)

            page.fill("#sensitivity input[type=number]", str(sensitivity))
            page.press("#sensitivity input[type=number]", "Enter")
            wait_until(lambda: shows(page, moved), f"the verdict at sensitivity {sensitivity}")
            assert moved.verdict != expected.verdict and "verdict changed" in page.inner_text("#status")
            wait_until(lambda: bot_messages(page)[0].startswith(STALE_MARK.strip()), "the earlier answers marked stale")
            ask(page, FIRST_QUESTION, grounded_answer(FIRST_QUESTION, moved))
            assert bot_messages(page)[-1].startswith("Yes" if moved.is_anomalous else "No")
            assert (counting.fits, counting.inspections) == (1, 1)  # nothing was encoded again

            other = browser.new_page()  # a second tab: its own session, empty
            other.goto(page_url)
            other.wait_for_selector("#verdict [data-verdict]")
            assert other.get_attribute("#verdict [data-verdict]", "data-verdict") == ""
            assert bot_messages(other) == []

            page.screenshot(path=str(SCREENSHOT.with_name("app_sensitivity.png")), full_page=True)
        finally:
            browser.close()


def test_upload_limit_is_set(page_url: str) -> None:
    import urllib.request

    with urllib.request.urlopen(page_url + "config") as response:
        config = json.load(response)
    assert config["max_file_size"] == MAX_UPLOAD_MB * 1024 * 1024
