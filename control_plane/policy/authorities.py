"""Where to lodge a complaint: a data protection authority per jurisdiction, from
``authorities.toml`` next to this module or the file QNP_COMPLAINT_AUTHORITIES names
(which replaces it whole). Loaded and checked once, when the web role starts: every
jurisdiction of ``privacy.deadlines`` needs a name and an https URL. Imports the
standard library and ``privacy.deadlines``; never ``proxy`` or the web app.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from control_plane.privacy.deadlines import JURISDICTIONS

BUILT_IN = Path(__file__).parent / "authorities.toml"


class AuthoritiesError(RuntimeError):
    """The authorities file is unreadable or incomplete; start-up stops."""


@dataclass(frozen=True, slots=True)
class Authority:
    name: str
    url: str
    note: str = ""


def load(path: Path | None = None) -> Mapping[str, Authority]:
    """Every jurisdiction's authority, from ``path`` (default: the built-in file)."""
    source = path or BUILT_IN
    try:
        raw = tomllib.loads(source.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise AuthoritiesError(f"complaint authorities file {source}: {e}") from None
    found: dict[str, Authority] = {}
    for jurisdiction in JURISDICTIONS:
        entry = raw.get(jurisdiction)
        if not isinstance(entry, dict):
            raise AuthoritiesError(f"complaint authorities file {source}: no "
                                   f"[{jurisdiction}] entry")
        name, url, note = entry.get("name"), entry.get("url"), entry.get("note", "")
        if not (isinstance(name, str) and name.strip() and isinstance(url, str)
                and url.startswith("https://") and isinstance(note, str)):
            raise AuthoritiesError(f"complaint authorities file {source}: "
                                   f"[{jurisdiction}] needs a name and an https url")
        found[jurisdiction] = Authority(name.strip(), url, note.strip())
    return found
