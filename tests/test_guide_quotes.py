"""What the guides quote fedlora printing is what it prints."""

from __future__ import annotations

import re
from pathlib import Path

from participant import daemon

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide-hospital-it.md"


def test_the_hospital_guide_quotes_the_daemons_closing_notes_word_for_word() -> None:
    quoted = [q for q in re.findall(r"`(fedlora: [^`]+)`", GUIDE.read_text()) if not q.startswith("fedlora: error:")]
    assert quoted, "the troubleshooting table quotes no closing note any more"
    notes = [*daemon.REFUSED.values(), getattr(daemon, "REVOKED", "")]  # what the daemon prints as it ends
    printed = {f"fedlora: {note}" for note in notes if note}
    assert not set(quoted) - printed, f"quoted but never printed: {set(quoted) - printed}; the daemon prints {printed}"
