"""Terminal chat over a ChatSession: streamed answers and slash commands; bad input is one line, the chat goes on."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from anomalygpt.assistant import ChatSession
from anomalygpt.cli import MAX_REFERENCES, one_line
from anomalygpt.io import list_images, load_image, write_json_atomic
from chat.session import AnswererSession

PROG = "anomalygpt chat"
HELP = """Ask anything about the image, or:
  /image PATH       inspect another image (same references); the conversation starts over
  /ref PATH...      new good references (files or folders); the image is inspected again
  /reset            forget the conversation (the image and its inspection stay)
  /save FILE        write the transcript and the inspection as JSON
  /help             this list
  /quit             leave (Ctrl-D too)"""
# What a bad file, image, option or disk raises: ImageError, InspectionError, QuestionError, WeightsError...
INPUT_ERRORS = (ValueError, OSError)


class Terminal:
    """Reads questions and commands, prints streamed answers; errors never end the session."""

    def __init__(
        self, session: ChatSession | AnswererSession, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.session = session
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr

    def error(self, problem: BaseException | str) -> None:
        print(f"{PROG}: error: {one_line(str(problem))}", file=self.err, flush=True)

    def show_facts(self) -> None:
        inspection = self.session.inspection
        print(f"[{inspection.source or 'image'}]\n{inspection.facts()}", file=self.out, flush=True)

    def ask(self, question: str) -> bool:
        """Stream the answer to one question; False (and one line on stderr) when it was refused."""
        pieces = self.session.stream(question)
        try:
            first = next(pieces, "")
        except INPUT_ERRORS as problem:
            self.error(problem)
            return False
        print(f"Q: {' '.join(question.split())}", file=self.out)
        print(f"A: {first.lstrip()}", end="", file=self.out, flush=True)
        for piece in pieces:
            print(piece, end="", file=self.out, flush=True)
        print(file=self.out, flush=True)
        return True

    def run(self, lines: Iterable[str]) -> int:
        """The REPL over lines (stdin, or a list in tests); returns the exit code."""
        for line in lines:
            if not self.handle(line):
                break
        return 0

    def handle(self, line: str) -> bool:
        """One line: a command or a question. False means quit."""
        text = line.strip()
        if not text.startswith("/"):
            self.ask(text)
            return True
        try:
            words = shlex.split(text)
        except ValueError as problem:  # an unclosed quote
            self.error(f"{text.split()[0]}: {problem}")
            return True
        command, args = words[0], words[1:]
        if command in ("/quit", "/exit"):
            return False
        try:
            self.command(command, args)
        except INPUT_ERRORS as problem:
            self.error(problem)
        return True

    def command(self, command: str, args: list[str]) -> None:
        if command == "/help":
            print(HELP, file=self.out, flush=True)
        elif command == "/reset":
            self.session.reset()
            print("conversation cleared; the image and its inspection stay", file=self.out, flush=True)
        elif command == "/image":
            self.show_image(args)
        elif command == "/ref":
            self.set_references(args)
        elif command == "/save":
            self.save(args)
        else:
            raise ValueError(f"unknown command {command}; /help lists the commands")

    def show_image(self, args: list[str]) -> None:
        if len(args) != 1:
            raise ValueError("/image takes one path (quote a path with spaces)")
        self.session.show(load_image(args[0]), source=args[0])
        self.show_facts()

    def set_references(self, args: list[str]) -> None:
        if not args:
            raise ValueError("/ref takes one or more good images or folders")
        paths = list_images(args)
        if len(paths) > MAX_REFERENCES:
            raise ValueError(f"/ref: {len(paths)} images given; at most {MAX_REFERENCES} are supported")
        self.session.set_references([load_image(path) for path in paths], [str(path) for path in paths])
        print(f"{len(paths)} good reference(s) indexed", file=self.out, flush=True)
        if self.session.context is not None:
            self.show_facts()

    def save(self, args: list[str]) -> None:
        if len(args) != 1:
            raise ValueError("/save takes one file name, e.g. /save chat.json")
        path = write_json_atomic(Path(args[0]), self.session.to_dict())
        print(f"saved {path}", file=self.out, flush=True)


def interactive_lines(prompt: str = "> ") -> Iterator[str]:
    """Lines typed at the terminal (a prompt only on a tty) until Ctrl-D or Ctrl-C."""
    shown = prompt if sys.stdin.isatty() else ""
    while True:
        try:
            yield input(shown)
        except (EOFError, KeyboardInterrupt):
            print()
            return
