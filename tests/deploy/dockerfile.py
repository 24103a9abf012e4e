"""Reading deploy/Dockerfile and .dockerignore without a container runtime.

Owns: splitting a Dockerfile into stages and instructions (continuation lines joined,
comments dropped, ``ARG`` defaults before the first ``FROM`` substituted), the exec
(JSON) form of ``CMD``/``ENTRYPOINT``, and the ``.dockerignore`` rule that decides
whether a path reaches the build context (last matching pattern wins, ``!`` re-includes).
Only what deploy/Dockerfile uses is supported; anything else is an error, not a guess.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


class DockerfileError(ValueError):
    """The Dockerfile uses something this reader does not understand."""


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ENV, ...
    args: str  # the rest of the line, continuation lines joined with spaces

    def exec_form(self) -> list[str]:
        """``["a", "b"]`` arguments of CMD/ENTRYPOINT; the shell form is refused."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            raise DockerfileError(f"{self.keyword} {self.args!r} is not in exec form") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DockerfileError(f"{self.keyword} must be a JSON list of strings")
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # comments may sit between continuation lines
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        line = (pending + stripped).strip()
        pending = ""
        if line:
            lines.append(line)
    if pending.strip():
        raise DockerfileError("the file ends in a continuation line")
    return lines


def parse(path: Path) -> list[Stage]:
    """The stages of the Dockerfile at ``path``, in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = _VAR.sub(lambda m: args[m.group(1) or m.group(2)], rest).split()
            if len(words) == 3 and words[1].upper() == "AS":
                stages.append(Stage(words[0], words[2]))
            elif len(words) == 1:
                stages.append(Stage(words[0], None))
            else:
                raise DockerfileError(f"FROM {rest!r}")
        elif not stages:
            raise DockerfileError(f"{keyword} before the first FROM")
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return stages


def stage_chain(stages: list[Stage], target: str) -> list[Stage]:
    """``target`` and the stages it is built FROM, the first one first."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [by_name[target]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def effective(chain: list[Stage], keyword: str) -> Instruction | None:
    """The CMD/ENTRYPOINT/USER in force at the end of ``chain`` (later stages win)."""
    for stage in reversed(chain):
        found = stage.last(keyword)
        if found is not None:
            return found
    return None


def copy_sources(instruction: Instruction) -> tuple[list[str], str, str | None]:
    """``(sources, destination, --from stage)`` of a COPY instruction."""
    words = instruction.args.split()
    source_stage = None
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        if flag.startswith("--from="):
            source_stage = flag.removeprefix("--from=")
        elif not flag.startswith(("--chown=", "--chmod=")):
            raise DockerfileError(f"COPY flag {flag}")
    if len(words) < 2:
        raise DockerfileError(f"COPY {instruction.args!r}")
    return words[:-1], words[-1], source_stage


def env_pairs(instruction: Instruction) -> dict[str, str]:
    """``ENV a=1 b=2`` as a mapping (the ``key=value`` form only)."""
    pairs: dict[str, str] = {}
    for word in instruction.args.split():
        name, sep, value = word.partition("=")
        if not sep:
            raise DockerfileError(f"ENV {instruction.args!r}: use the key=value form")
        pairs[name] = value
    return pairs


def ignored(patterns: list[str], relative_path: str) -> bool:
    """Whether ``.dockerignore`` ``patterns`` keep ``relative_path`` out of the context.

    A pattern also matches everything below a folder it matches, as Docker's does.
    """
    parts = relative_path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        if body.startswith("**/"):
            matched = any(fnmatch.fnmatchcase(part, body[3:]) for part in parts)
        else:
            matched = any(fnmatch.fnmatchcase(prefix, body) for prefix in prefixes)
        if matched:
            verdict = not negated
    return verdict


def dockerignore(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]
