"""The web page (``GET /ui``): feature browser, playground and inspect view, as static HTML, CSS and
JavaScript shipped in the package; no build step, nothing fetched from the internet."""

from pathlib import Path

STATIC = Path(__file__).with_name("static")
