"""Writes .env from .env.example on a first run, with a freshly generated SECRET_KEY.
An existing .env is never touched."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
target = root / ".env"
if target.exists():
    sys.exit(0)
lines = []
for line in (root / ".env.example").read_text().splitlines():
    if line.startswith("SECRET_KEY="):
        line = f"SECRET_KEY={secrets.token_urlsafe(50)}"
    lines.append(line)
target.write_text("\n".join(lines) + "\n")
target.chmod(0o600)
print(f"Wrote {target.name} with a new SECRET_KEY; edit it to point the portal at your proxy.")
