"""`anomalygpt chat IMAGE [--ref GOOD...]`: inspect an image, then talk about it in the terminal.

With --ask (repeatable) each question is answered in turn and the command exits; without, it is a REPL.
--answerer llm (default) answers with the preset's LLM assistant, grounded with templates and no language model;
--json prints nothing but one JSON document at the end: inspection, evidence, transcript and the claim checker's
tally. Exit codes: 0 done, 2 bad input (the image, a reference, the preset, or a refused --ask question).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anomalygpt.answerers import CHAT_ANSWERERS
from anomalygpt.cli import MAX_REFERENCES, CliParser, UsageError, check_sensitivity, one_line
from anomalygpt.devices import add_device_option, with_device
from anomalygpt.io import list_images, load_image
from chat.terminal import PROG, Terminal, interactive_lines

if TYPE_CHECKING:
    from anomalygpt.assistant import ChatSession
    from anomalygpt.config import Preset
    from chat.session import AnswererSession


@dataclass(frozen=True)
class ChatOptions:
    image: str
    refs: list[str]
    preset: str | None  # None: the default preset, or the profile's own
    class_name: str | None
    questions: list[str]  # --ask, in order; empty: the REPL
    sensitivity: float
    answerer: str = "llm"  # one of anomalygpt.answerers.CHAT_ANSWERERS
    as_json: bool = False  # print one JSON document at the end instead of the conversation
    profile: Path | None = None  # a fitted product profile, instead of refs
    device: str | None = None  # --device: overrides the preset's


def build_parser() -> CliParser:
    parser = CliParser(
        prog=PROG,
        description="Inspect IMAGE against good references, then chat about the result. Put IMAGE before --ref.",
    )
    parser.add_argument("image", metavar="IMAGE", help="the image to inspect and talk about")
    parser.add_argument(
        "--ref",
        action="extend",
        nargs="+",
        default=[],
        metavar="GOOD",
        help=f"good images (files or folders) of the same product, 1 to {MAX_REFERENCES}; none: zero-shot",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="a product profile from 'anomalygpt fit' (instead of --ref)"
    )
    parser.add_argument(
        "--preset", default=None, help="preset name or JSON path (default: 'default', or the profile's own)"
    )
    parser.add_argument("--class-name", default=None, help="product name, e.g. 'screw'")
    parser.add_argument(
        "--ask", action="append", default=[], metavar="QUESTION", help="ask, print the answer and exit (repeatable)"
    )
    parser.add_argument("--sensitivity", type=float, default=0.0, help="-5 to 5 normal spreads; > 0: more alarms")
    parser.add_argument(
        "--answerer",
        choices=CHAT_ANSWERERS,
        default="llm",
        help="llm: the preset's LLM assistant (grounded opening, checked sentences); grounded: templates, no LLM",
    )
    parser.add_argument(
        "--json", action="store_true", help="print only the transcript and inspection as one JSON document at the end"
    )
    add_device_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(None if argv is None else list(argv))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    options = ChatOptions(
        args.image,
        list(args.ref),
        args.preset,
        args.class_name,
        list(args.ask),
        args.sensitivity,
        args.answerer,
        args.json,
        args.profile,
        args.device,
    )
    try:
        terminal = open_terminal(options)
    except (ValueError, OSError) as error:  # ImageError, InspectionError, ConfigError, WeightsError...
        print(f"{PROG}: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    if options.as_json:
        terminal.out = io.StringIO()  # the conversation is in the JSON document
    terminal.show_facts()
    if options.questions:
        answered = [terminal.ask(question) for question in options.questions]
        code = 0 if all(answered) else 2
    else:
        if not options.as_json:
            print("Ask about the image; /help lists the commands.", file=sys.stdout, flush=True)
        code = terminal.run(interactive_lines())
    if options.as_json:
        print(json.dumps(terminal.session.to_dict(), indent=1, allow_nan=False), flush=True)
    return code


def open_terminal(options: ChatOptions) -> Terminal:
    """Check the inputs (cheapest first), build inspector and assistant, inspect the image."""
    check_sensitivity(options.sensitivity)
    image = load_image(options.image)
    if options.profile is not None and options.refs:
        raise UsageError("--profile and --ref: give the references one way, a profile or image files")
    if options.profile is not None and not options.profile.is_file():
        raise UsageError(f"{options.profile}: --profile file not found")
    references = list_images(options.refs) if options.refs else []
    if len(references) > MAX_REFERENCES:
        raise UsageError(f"--ref: {len(references)} images given; at most {MAX_REFERENCES} are supported")
    reference_images = [load_image(path) for path in references]
    from anomalygpt.profile import chosen_preset  # torch and transformers: after the checks

    preset = with_device(chosen_preset(options.preset, options.profile), options.device)
    session = chat_session(preset, options)
    if options.profile is not None:
        session.use_profile(options.profile)
    if reference_images:
        session.set_references(reference_images, [str(path) for path in references])
    session.show(image, source=options.image)
    return Terminal(session)


def chat_session(preset: Preset, options: ChatOptions) -> ChatSession | AnswererSession:
    """The LLM assistant's session, or the grounded answerer's (no language model is loaded)."""
    from anomalygpt.assistant import ChatSession, build_assistant

    if options.answerer == "grounded":
        from anomalygpt.answerers import GroundedAnswerer
        from anomalygpt.inspection import build_inspector
        from chat.session import AnswererSession

        answerer = GroundedAnswerer(preset.assistant.defect_types)
        return AnswererSession(build_inspector(preset), answerer, options.class_name, options.sensitivity)
    if not preset.assistant.weights:
        print(
            f"{PROG}: note: preset {preset.name!r} names no trained assistant weights; answers come from untrained "
            "parts (the verdict is still the detector's)",
            file=sys.stderr,
        )
    return ChatSession(build_assistant(preset, inference=True), options.class_name, options.sensitivity)
