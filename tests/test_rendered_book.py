"""The built book, page by page, in a real browser (headless Chromium).

`make test` builds the book into ``_build/html`` first, then runs this
module. Every HTML page found there (chapters added later included) is
served over HTTP on 127.0.0.1 and opened in one Chromium, 1280 px wide, then
390 px wide (a phone). A page fails when it shows any of:

- a JavaScript error (console error or uncaught exception), a failed
  request, or any request leaving 127.0.0.1 (the book works offline);
- raw TeX in its text (``$$``, ``\\frac``, ``\\(`` ... outside code), a
  formula MathJax did not render or rendered as an error;
- a markdown table shown as text (``| --- |``) instead of a ``<table>``;
- an image that did not load, or drawn with another aspect ratio than its
  pixels (a 2x figure's inline size on a narrow screen);
- a code block (source or output) wider than its box at 1280 px;
- page content wider than a 390 px phone screen (code blocks, display
  equations and tables scroll inside their own box instead);
- an exercise solution that does not open when clicked;
- a heading with a hand-typed number under the book's own numbering.

The offline search must find "momentum". On failure a full-page screenshot
is saved under ``_build/screenshots/`` and named in the message.

Playwright drives Debian's ``chromium`` (or Google Chrome) from PATH;
playwright's own browser download needs the internet. Without a browser the
tests skip with one line, unless ``REQUIRE_BROWSER_TESTS=1`` (set by
``.ci/run``, which installs Chromium). Without a built book they skip too,
unless ``REQUIRE_BOOK_BUILD=1`` (set by ``make test``, which builds it).
``BOOK_HTML=dir`` checks a book built elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK_HTML = Path(os.environ.get("BOOK_HTML", ROOT / "_build" / "html"))
SCREENSHOTS = BOOK_HTML.parent / "screenshots"
BROWSER_REQUIRED = os.environ.get("REQUIRE_BROWSER_TESTS") == "1"
BUILD_REQUIRED = (
    BROWSER_REQUIRED or os.environ.get("REQUIRE_BOOK_BUILD") == "1"
)

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Debian's package, Ubuntu's, Google Chrome (GitHub's runners have it),
# and Chrome on macOS.
BROWSER_NAMES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
)
MACOS_CHROME = Path(
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"
)

# TeX that MathJax should have turned into a formula. Searched in the
# page's text with code, scripts and rendered formulas removed.
RAW_TEX = re.compile(
    r"\$\$"  # display math left as text
    r"|\\[()\[\]]"  # \( \) \[ \] delimiters of a formula not rendered
    r"|\\[A-Za-z]{2,}"  # \frac, \begin, \sigma, ... outside code
    r"|\$[^\s$][^$\n]{0,200}[^\s$\d]\$"  # $x^2$ left as text
)
# A markdown table's delimiter row shown as text ("| --- |", or "| — |"
# after smart dashes turned the hyphens into an em dash).
RAW_TABLE = re.compile(r"\|\s*:?(?:-{3,}|[—–]+)[-—–]*:?\s*\|")
# "4.1. 1. Inference ...": a number typed by hand under the automatic one.
HAND_NUMBER = re.compile(r"^(\d+(\.\d+)*\.?|[a-z]\.)\s")


def _find_browser() -> str | None:
    override = os.environ.get("BROWSER_EXECUTABLE")
    if override:
        return override
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return str(MACOS_CHROME) if MACOS_CHROME.exists() else None


def _unavailable(reason: str, required: bool) -> None:
    if required:
        pytest.fail(f"{reason} (required here)", pytrace=False)
    pytest.skip(reason)


def _is_redirect(path: Path) -> bool:
    head = path.read_text(encoding="utf-8", errors="replace")[:2000]
    return 'http-equiv="Refresh"' in head or "http-equiv='Refresh'" in head


def discover_pages(html: Path = BOOK_HTML) -> tuple[list[str], list[str]]:
    """The book's pages and its redirect stubs, as paths relative to html.

    Everything in folders starting with ``_`` (``_static``, ``_sources``,
    ``_images``) is an asset, not a page.
    """
    pages, redirects = [], []
    if not html.is_dir():
        return pages, redirects
    for path in sorted(html.rglob("*.html")):
        relative = path.relative_to(html)
        if any(part.startswith("_") for part in relative.parts[:-1]):
            continue
        target = redirects if _is_redirect(path) else pages
        target.append(relative.as_posix())
    return pages, redirects


PAGES, REDIRECTS = discover_pages()
NOT_BUILT = (
    f"the book is not built ({BOOK_HTML} has no pages): "
    "run `make book` first (`make test` does)"
)
NO_BROWSER = (
    "no Chromium on PATH (apt-get install chromium): "
    "browser tests of the built book skipped"
)
# One line in pytest's summary when a test cannot run here, not one per page.
if _find_browser() is None and not BROWSER_REQUIRED:
    pytest.skip(NO_BROWSER, allow_module_level=True)
if not PAGES and not BUILD_REQUIRED:
    pytest.skip(NOT_BUILT, allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _serve(directory: Path) -> Iterator[str]:
    """``python -m http.server`` on a free port; yields its base URL."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            str(port),
            "--directory",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(base, timeout=2):
                    break
            except OSError as error:
                if time.monotonic() > deadline or process.poll() is not None:
                    message = f"http.server did not start on {base}"
                    raise RuntimeError(message) from error
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


class PageWatch:
    """Collects a page's console errors, exceptions and failed requests."""

    def __init__(self, page: Any, base: str) -> None:
        self.errors: list[str] = []
        self.failed: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"exception: {e}"))
        page.on("requestfailed", self._request_failed)
        page.on("response", self._response)
        page.on("request", lambda r: self._request(r, base))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _request_failed(self, request: Any) -> None:
        self.failed.append(f"{request.url} ({request.failure})")

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.failed.append(f"{response.url} (HTTP {response.status})")

    def _request(self, request: Any, base: str) -> None:
        url = request.url
        if not url.startswith((base, "data:", "blob:", "about:")):
            self.failed.append(f"{url} (leaves the machine)")


# One round trip per phase. Images and MathJax are awaited first.
SETTLE_JS = """
async () => {
  const images = [...document.images];
  for (const img of images) img.loading = "eager";
  await Promise.all(images.map((img) => img.complete ? null :
    new Promise((done) => {
      img.addEventListener("load", done, {once: true});
      img.addEventListener("error", done, {once: true});
    })));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
}
"""

# Images drawn with another aspect ratio than their pixels (more than 2 %).
DISTORTED_JS = """
const distorted = () => [...document.images]
  .filter((img) => img.naturalWidth > 0 && img.getClientRects().length > 0)
  .filter((img) => {
    const box = img.getBoundingClientRect();
    const drawn = box.width / box.height;
    const natural = img.naturalWidth / img.naturalHeight;
    return box.height > 0 && Math.abs(drawn / natural - 1) > 0.02;
  })
  .map((img) => `${img.getAttribute("src")} drawn `
    + `${Math.round(img.getBoundingClientRect().width)}x`
    + `${Math.round(img.getBoundingClientRect().height)}, pixels `
    + `${img.naturalWidth}x${img.naturalHeight}`);
"""

DESKTOP_JS = (
    r"""
() => {
"""
    + DISTORTED_JS
    + r"""
  const article = document.querySelector("article") || document.body;
  const report = {};
  const images = [...document.images];
  report.images = images.length;
  report.brokenImages = images
    .filter((img) => !(img.complete && img.naturalWidth > 0))
    .map((img) => img.getAttribute("src"));
  report.distorted = distorted();
  const math = [...article.querySelectorAll(".math")];
  report.math = math.length;
  report.unrendered = math
    .filter((el) => !el.querySelector("mjx-container"))
    .map((el) => el.textContent.trim().slice(0, 80));
  report.mathErrors = [...article.querySelectorAll("mjx-merror")]
    .map((el) => el.getAttribute("data-mjx-error") || el.textContent);
  report.tables = article.querySelectorAll("table").length;
  const clone = article.cloneNode(true);
  clone.querySelectorAll(
    "pre, code, script, style, textarea, mjx-container, .highlight"
  ).forEach((el) => el.remove());
  report.text = clone.textContent;
  report.headings = [...article.querySelectorAll("h1, h2, h3, h4")]
    .map((h) => {
      const c = h.cloneNode(true);
      c.querySelectorAll(".section-number, .headerlink")
        .forEach((el) => el.remove());
      return c.textContent.trim();
    });
  return report;
}
"""
)

# Exercise solutions: closed behind a toggle until clicked.
SOLUTIONS_JS = """
() => [...document.querySelectorAll(".solution.dropdown")].map((s) => ({
  id: s.id,
  closed: s.classList.contains("toggle-hidden"),
}))
"""

# Clicks the title of each given solution; returns those still closed.
OPEN_SOLUTIONS_JS = """
(ids) => ids.filter((id) => {
  const solution = document.getElementById(id);
  solution.querySelector(".admonition-title").click();
  const body = solution.querySelector("section");
  return solution.classList.contains("toggle-hidden")
    || !body || body.getClientRects().length === 0;
})
"""

# Code boxes: every <pre>, hidden ones (hide-input) opened first.
OVERFLOW_JS = """
() => {
  document.querySelectorAll("details").forEach((d) => { d.open = true; });
  const boxes = [...document.querySelectorAll("article pre")]
    .filter((pre) => pre.getClientRects().length > 0);
  return {
    total: boxes.length,
    top: Math.min(...boxes
      .filter((pre) => pre.scrollWidth > pre.clientWidth)
      .map((pre) => pre.getBoundingClientRect().top + window.scrollY)),
    wide: boxes
      .filter((pre) => pre.scrollWidth > pre.clientWidth)
      .map((pre) => {
        const kind = pre.closest(".cell_output, .output") ? "output" : "code";
        const line = pre.textContent.split("\\n")
          .reduce((a, b) => (b.length > a.length ? b : a), "");
        return `${kind} box ${pre.clientWidth}px, content ` +
          `${pre.scrollWidth}px: ${line.trim().slice(0, 60)}`;
      }),
  };
}
"""

# At phone width: how wide is the page, and which elements stick out (the
# outermost ones, not counting what scrolls or is clipped inside its box).
PHONE_JS = (
    """
() => {
"""
    + DISTORTED_JS
    + """
  const width = window.innerWidth;
  const page = Math.max(
    document.documentElement.scrollWidth, document.body.scrollWidth);
  const culprits = [];
  let top = 0;
  const walk = (parent) => {
    for (const el of parent.children) {
      if (culprits.length >= 5) return;
      if (el.getBoundingClientRect().right > width + 1) {
        if (!culprits.length) {
          top = el.getBoundingClientRect().top + window.scrollY;
        }
        culprits.push(`<${el.tagName.toLowerCase()} class="${el.className}">`
          + ` ${el.textContent.trim().slice(0, 50)}`);
      } else if (getComputedStyle(el).overflowX === "visible") {
        walk(el);
      }
    }
  };
  if (page > width) walk(document.body);
  return {width, page, culprits, top, distorted: distorted()};
}
"""
)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.removesuffix(".html"))


SHOT_HEIGHT = 6000
"""Longest screenshot, in CSS pixels: a whole chapter at 390 px is ~100,000
px tall, which Chromium renders in tiles for minutes. JPEG, because
encoding a PNG of 1280 x 6000 pixels takes seconds."""


async def _screenshot(
    page: Any, name: str, suffix: str, focus: float = 0
) -> str:
    """Full-width screenshot of the page, from a little above ``focus``.

    The whole page when it is at most SHOT_HEIGHT tall; else SHOT_HEIGHT
    pixels from 1,000 above the first problem found (``focus``, in page
    coordinates).
    """
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{_slug(name)}-{suffix}.jpg"
    width, height = await page.evaluate(
        "() => [document.documentElement.scrollWidth,"
        " document.documentElement.scrollHeight]"
    )
    if height <= SHOT_HEIGHT:
        await page.screenshot(path=str(path), full_page=True, quality=80)
        return str(path)
    top = max(0, min(focus - 1000, height - SHOT_HEIGHT))
    clip = {"x": 0, "y": top, "width": width, "height": SHOT_HEIGHT}
    await page.screenshot(
        path=str(path), full_page=True, clip=clip, quality=80
    )
    return f"{path} (page y {top:.0f} to {top + SHOT_HEIGHT:.0f})"


def _snippets(pattern: re.Pattern[str], text: str, limit: int = 3) -> list:
    found = []
    for match in pattern.finditer(text):
        start = max(match.start() - 30, 0)
        found.append(" ".join(text[start : match.end() + 30].split()))
        if len(found) == limit:
            break
    return found


def _record(name: str, figures: dict[str, Any]) -> None:
    """Append the page's figures to $BOOK_BROWSER_REPORT (JSON lines)."""
    target = os.environ.get("BOOK_BROWSER_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as stream:
            stream.write(json.dumps({"page": name, **figures}) + "\n")


async def check_page(context: Any, base: str, name: str) -> list[str]:
    """Every problem the page shows a reader, as lines of text."""
    page = await context.new_page()
    watch = PageWatch(page, base)
    problems: list[str] = []
    try:
        await page.set_viewport_size(DESKTOP)
        await page.goto(base + name, wait_until="load")
        await page.evaluate(SETTLE_JS)
        desk = await page.evaluate(DESKTOP_JS)
        text = desk.pop("text")
        for src in desk["brokenImages"]:
            problems.append(f"image did not load: {src}")
        for image in desk["distorted"]:
            problems.append(f"image distorted at 1280 px: {image}")
        for tex in desk["unrendered"]:
            problems.append(f"formula not rendered by MathJax: {tex}")
        for error in desk["mathErrors"]:
            problems.append(f"MathJax error: {error}")
        for snippet in _snippets(RAW_TEX, text):
            problems.append(f"raw TeX in the text: ...{snippet}...")
        for snippet in _snippets(RAW_TABLE, text):
            problems.append(f"markdown table shown as text: ...{snippet}...")
        for heading in desk["headings"]:
            if HAND_NUMBER.match(heading):
                problems.append(f"hand-numbered heading: {heading!r}")

        solutions = await page.evaluate(SOLUTIONS_JS)
        closed = [sol["id"] for sol in solutions if sol["closed"]]
        if len(closed) < len(solutions):
            problems.append(
                f"{len(solutions) - len(closed)} of {len(solutions)} "
                "solutions are open before the reader asks"
            )
        if closed:
            # The first one as a reader does (a real click, hit-tested);
            # the others by a click event, which is faster.
            solution = page.locator(f'[id="{closed[0]}"]')
            await solution.locator(".admonition-title").first.click()
            await solution.locator("section").first.wait_for(state="visible")
            still = await page.evaluate(OPEN_SOLUTIONS_JS, closed[1:])
            first_class = await solution.get_attribute("class") or ""
            if "toggle-hidden" in first_class:
                still.insert(0, closed[0])
            for ident in still:
                problems.append(f"solution {ident} does not open on click")

        boxes = await page.evaluate(OVERFLOW_JS)
        for wide in boxes["wide"]:
            problems.append(
                f"code block wider than its box at 1280 px: {wide}"
            )
        if problems:
            focus = boxes["top"] if boxes["wide"] else 0
            shot = await _screenshot(page, name, "1280", focus)
            problems.append(f"screenshot at 1280 px: {shot}")

        await page.set_viewport_size(PHONE)
        await page.evaluate("() => new Promise(requestAnimationFrame)")
        phone = await page.evaluate(PHONE_JS)
        for image in phone["distorted"]:
            problems.append(f"image distorted at 390 px: {image}")
        if phone["page"] > phone["width"]:
            problems.append(
                f"page {phone['page']} px wide on a {phone['width']} px "
                f"phone; sticking out: {phone['culprits']}"
            )
        if phone["page"] > phone["width"] or phone["distorted"]:
            shot = await _screenshot(page, name, "390", phone["top"])
            problems.append(f"screenshot at 390 px: {shot}")
    finally:
        await page.close()
    problems[:0] = [f"JavaScript error: {e}" for e in watch.errors]
    problems[:0] = [f"failed request: {f}" for f in watch.failed]
    _record(
        name,
        {
            "js_errors": len(watch.errors),
            "failed_requests": len(watch.failed),
            "code_boxes": boxes["total"],
            "overflowing": len(boxes["wide"]),
            "tables": desk["tables"],
            "raw_tables": len(RAW_TABLE.findall(text)),
            "math": desk["math"],
            "unrendered_math": len(desk["unrendered"]),
            "raw_tex": len(RAW_TEX.findall(text)),
            "images": desk["images"],
            "broken_images": len(desk["brokenImages"]),
            "distorted_images": len(desk["distorted"] + phone["distorted"]),
            "solutions": len(solutions),
            "solutions_closed": len(closed),
            "phone_width": phone["page"],
            "hand_numbered": sum(
                bool(HAND_NUMBER.match(h)) for h in desk["headings"]
            ),
        },
    )
    return problems


async def check_search(context: Any, base: str) -> list[str]:
    """The offline search (search.html?q=momentum) lists chapters."""
    page = await context.new_page()
    watch = PageWatch(page, base)
    problems: list[str] = []
    try:
        await page.goto(base + "search.html?q=momentum", wait_until="load")
        results = page.locator("#search-results ul.search li")
        try:
            await results.first.wait_for(state="attached", timeout=20_000)
            links = await results.locator("a").evaluate_all(
                "(links) => links.map((a) => a.getAttribute('href'))"
            )
            if not any(link.startswith("book/") for link in links):
                problems.append(f"no chapter among the results: {links}")
        except Exception as error:
            shot = await _screenshot(page, "search", "1280")
            problems.append(f"no results for 'momentum' ({error}); {shot}")
    finally:
        await page.close()
    return [f"JavaScript error: {e}" for e in watch.errors] + problems


async def check_redirect(context: Any, base: str, name: str) -> list[str]:
    """A redirect stub (index.html) lands on a page of the book."""
    page = await context.new_page()
    try:
        await page.goto(base + name)
        await page.wait_for_url(re.compile(r".*/book/.*\.html$"))
        if await page.locator("article h1").count() != 1:
            return [f"{name} lands on {page.url}, which has no title"]
        return []
    except Exception as error:
        return [f"{name} does not land on a page of the book: {error}"]
    finally:
        await page.close()


TABS = int(os.environ.get("BROWSER_TABS", min(4, (os.cpu_count() or 1) + 1)))
"""Pages checked at once, each in its own tab (renderer process)."""


async def _check_all(executable: str, base: str, jobs: list[str]) -> dict:
    """Run the jobs ("page:NAME", "search", "redirect:NAME") in TABS tabs."""
    from playwright.async_api import async_playwright

    results: dict[str, list[str]] = {}
    pending = list(jobs)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=BROWSER_ARGS
        )
        context = await browser.new_context(
            viewport=DESKTOP, service_workers="block"
        )
        # Generous: a busy 2-core machine can take a minute for one page.
        context.set_default_timeout(180_000)

        async def tab() -> None:
            while pending:
                job = pending.pop(0)
                kind, _, name = job.partition(":")
                try:
                    if kind == "page":
                        results[job] = await check_page(context, base, name)
                    elif kind == "search":
                        results[job] = await check_search(context, base)
                    else:
                        results[job] = await check_redirect(
                            context, base, name
                        )
                except Exception as error:  # a crash is this job's failure
                    results[job] = [f"the check itself failed: {error!r}"]

        try:
            await asyncio.gather(*(tab() for _ in range(TABS)))
        finally:
            await browser.close()
    return results


def _job(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("name") if callspec else None
    if item.originalname == "test_page_reads_well_in_a_browser":
        return f"page:{name}"
    if item.originalname == "test_offline_search_finds_momentum":
        return "search"
    if item.originalname == "test_redirect_pages_land_on_a_page_of_the_book":
        return f"redirect:{name}"
    return None


@pytest.fixture(scope="session")
def checked(request: pytest.FixtureRequest) -> dict[str, list[str]]:
    """Every selected page's problems, all checked in one browser at once."""
    executable = _find_browser()
    if executable is None:
        _unavailable(NO_BROWSER, BROWSER_REQUIRED)
    if not PAGES:
        _unavailable(NOT_BUILT, BUILD_REQUIRED)
    jobs = [
        job
        for item in request.session.items
        # nbval's notebook cells have no .module
        if getattr(item, "module", None) is sys.modules[__name__]
        and (job := _job(item))
    ]
    with _serve(BOOK_HTML) as base:
        return asyncio.run(_check_all(str(executable), base, jobs))


def _verdict(checked: dict[str, list[str]], job: str) -> None:
    problems = checked[job]
    if problems:
        pytest.fail(f"{job}:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.mark.parametrize("name", PAGES or [NOT_BUILT])
def test_page_reads_well_in_a_browser(name: str, checked: dict) -> None:
    _verdict(checked, f"page:{name}")


def test_offline_search_finds_momentum(checked: dict) -> None:
    _verdict(checked, "search")


@pytest.mark.parametrize("name", REDIRECTS or ["index.html"])
def test_redirect_pages_land_on_a_page_of_the_book(
    name: str, checked: dict
) -> None:
    if not REDIRECTS:
        pytest.fail(f"no redirect page (index.html) in {BOOK_HTML}")
    _verdict(checked, f"redirect:{name}")
