"""The web page in a real browser (Debian's chromium driven by Playwright): search a feature, open it,
steer a prompt beside the unsteered output, inspect an image's heatmaps, behind an API key too.

Screenshots go to a temporary directory, or to ``$LMM_STEER_SCREENSHOTS`` (docs/ui keeps the
committed ones)."""

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from servers import Server

from lmm_steer.scenes.generate import generate

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
MODEL = "builtin:tiny-llava-next"


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-scene")
    generate(root, 1, seed=51)
    return root / "images" / "000000.png"


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, scene):
    root = tmp_path_factory.mktemp("ui")
    rows = [
        {"feature": 3, "explanation": "red circles", "max_activation": 4.0, "density": 0.01,
         "top_contexts": [{"text": "a bright «red» ball", "activation": 3.5}],
         "top_images": [{"image": str(scene), "activation": 2.0, "grid": [[0.0, 1.5], [0.0, 0.2]]}],
         "scores": {"iou": 0.42, "clip": 24.1, "best_iou": 0.61, "best_phrase": [["colour", "red"], ["category", "circle"]]}},
        {"feature": 7, "explanation": "ocean waves and the sea", "max_activation": 9.0,
         "steer": {"onset": 5.0, "limit": 20.0, "value": 15.0}, "top_contexts": [{"text": "the «sea» was calm"}]},
        {"feature": 11, "explanation": "written text on street signs", "max_activation": 6.0},
    ]
    catalog = root / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(r) + "\n" for r in rows))
    presets = root / "presets.json"
    presets.write_text(json.dumps({"name": "red-up", "description": "more red", "steering": {"features": [{"id": 3, "value": 30.0}]}}))
    keys = root / "keys.txt"
    keys.write_text("secret-key\n")
    s = Server("--model", MODEL, "--sae", "builtin:random-topk:latents=64,k=8", "--hookpoint", "model.layers.1",
               "--catalog", str(catalog), "--presets", str(presets), "--api-key-file", str(keys), key="secret-key")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _shots() -> Path:
    out = Path(os.environ.get("LMM_STEER_SCREENSHOTS") or Path(os.environ.get("TMPDIR", "/tmp")) / "lmm-steer-ui")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _search_and_open(page, url: str, query: str, feature: int) -> None:
    """From the features view, search ``query`` and open ``feature``'s page from the results."""
    page.goto(f"{url}/ui#/features")
    page.fill("#search-q", query)
    page.press("#search-q", "Enter")
    page.click(f"#search-results a[href='#/feature/{feature}']")  # waits for the result to appear


def _steer(page, number: str, max_tokens: str, row: str = "#play-features li:first-child") -> None:
    """Set the playground's first feature's value (or strength), generate, and wait for both outputs."""
    page.fill(f"{row} input[type=number]", number)
    page.dispatch_event(f"{row} input[type=number]", "change")
    page.fill("#play-max", max_tokens)
    page.click("#play-run")
    page.wait_for_function("!document.getElementById('play-run').disabled && "
                           "document.getElementById('out-steered').textContent.length > 0 && "
                           "document.getElementById('out-unsteered').textContent.length > 0")


def test_the_page_and_its_files_need_no_key_but_the_api_does(ui_server):
    page = httpx.get(f"{ui_server.url}/ui")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "app.js" in page.text
    assert httpx.get(f"{ui_server.url}/ui/static/app.js").status_code == 200
    assert httpx.get(f"{ui_server.url}/v1/models").status_code == 401
    assert "/ui" not in ui_server.get("/openapi.json").json()["paths"]


def test_search_open_steer_and_inspect_in_a_real_browser(ui_server, browser, scene):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{ui_server.url}/ui")
    page.fill("#api-key", "secret-key")
    page.press("#api-key", "Tab")  # change event: the key is kept in session storage and used
    page.wait_for_function("document.getElementById('model-name').textContent.length > 0")
    assert page.text_content("#model-name") == MODEL
    assert page.evaluate("sessionStorage.getItem('lmm-steer-api-key')") == "secret-key"
    # every control has a label a screen reader and keyboard user can find
    unlabeled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')].filter(e =>
        !e.getAttribute('aria-label') && !(e.id && document.querySelector(`label[for="${e.id}"]`))).map(e => e.id)""")
    assert unlabeled == []

    page.fill("#search-q", "red")
    page.press("#search-q", "Enter")  # keyboard only
    page.wait_for_selector("#search-results li")
    assert "red circles" in page.text_content("#search-results")
    page.screenshot(path=str(_shots() / "features.png"))
    page.click("#search-results a[href='#/feature/3']")
    page.wait_for_function("document.querySelector('#feature-images img')?.naturalWidth > 0")
    page.wait_for_function("""(() => { const c = document.querySelector('#feature-images canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] < 120) return true; return false; })()""")
    assert page.text_content("#feature-explanation") == "red circles"
    assert page.text_content("#feature-contexts mark") == "red"
    assert "0.42" in page.text_content("#feature-stats")
    assert "best possible explanation" in page.text_content("#feature-stats")
    assert "red circle" in page.text_content("#feature-stats")
    page.screenshot(path=str(_shots() / "feature.png"))

    page.click("#feature-to-playground")
    page.wait_for_selector("#view-playground:not([hidden]) #play-features li")
    page.fill("#play-add", "sea")
    page.wait_for_function("document.querySelectorAll('#play-suggestions option').length > 0")
    page.fill("#play-add", page.eval_on_selector("#play-suggestions option", "o => o.value"))
    page.press("#play-add", "Enter")
    page.wait_for_function("document.querySelectorAll('#play-features li').length === 2")
    assert "strength" in page.text_content("#play-features")  # feature 7 is calibrated
    page.fill("#play-features li:first-child input[type=number]", "20")
    page.dispatch_event("#play-features li:first-child input[type=number]", "change")
    assert page.eval_on_selector("#play-features li:first-child input[type=range]", "r => r.value") == "20"
    page.fill("#play-max", "12")
    page.click("#play-run")
    page.wait_for_function("!document.getElementById('play-run').disabled && "
                           "document.getElementById('out-unsteered').textContent.length > 0")
    steered, plain = page.text_content("#out-steered"), page.text_content("#out-unsteered")
    assert steered and plain and steered != plain
    assert page.is_hidden("#error")
    page.fill("#sweep-values", "0, 40")
    page.click("#sweep-run")
    page.wait_for_function("[...document.querySelectorAll('#sweep-table td')].filter(t => t.textContent !== '…').length === 2")
    assert page.eval_on_selector_all("#sweep-table th[scope=row]", "ths => ths.map(t => t.textContent)") == ["0", "40"]
    assert page.eval_on_selector_all("#play-preset option", "os => os.map(o => o.value)") == ["", "red-up"]
    page.screenshot(path=str(_shots() / "playground.png"), full_page=True)

    page.click("#nav-inspect")
    page.set_input_files("#inspect-image", str(scene))
    page.click("#inspect-form button[type=submit]")
    page.wait_for_selector("#inspect-grids canvas")
    assert page.eval_on_selector_all("#inspect-grids canvas", "cs => cs.length") >= 1
    painted = page.eval_on_selector("#inspect-grids canvas", """c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let red = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] < 120) red++; return red; }""")
    assert painted > 0  # the heatmap is drawn over the image
    assert "image tokens" in page.text_content("#inspect-status")
    page.screenshot(path=str(_shots() / "inspect.png"), full_page=True)
    page.click("#inspect-grids figcaption a")
    page.wait_for_selector("#view-feature:not([hidden])")
    assert errors == []
    page.close()


def test_a_wrong_key_shows_the_servers_error(ui_server, browser):
    page = browser.new_page()
    page.goto(f"{ui_server.url}/ui")
    page.wait_for_selector("#error:not([hidden])")
    assert "API key" in page.text_content("#error")
    page.close()


def test_the_page_on_a_text_only_model(browser, tmp_path):
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(json.dumps({"feature": 5, "explanation": "music and songs", "max_activation": 8.0,
                                   "top_contexts": [{"text": "a lovely «song»", "activation": 7.0}]}) + "\n")
    server = Server("--model", "builtin:tiny-llama", "--sae", "builtin:random-topk", "--catalog", str(catalog))
    page = browser.new_page()
    try:
        _search_and_open(page, server.url, "music", 5)
        page.wait_for_function("document.getElementById('feature-explanation').textContent === 'music and songs'")
        assert "No top images" in page.text_content("#feature-images")
        page.click("#feature-to-playground")
        _steer(page, "60", "10")
        assert page.text_content("#out-steered") != page.text_content("#out-unsteered")
        page.click("#nav-inspect")
        page.click("#inspect-form button[type=submit]")  # text alone: per-position features, no heatmap
        page.wait_for_selector("#inspect-positions li")
        assert page.eval_on_selector_all("#inspect-grids canvas", "cs => cs.length") == 0
        assert page.is_hidden("#error")
    finally:
        page.close()
        server.stop()


SCENES_SAE = Path(__file__).resolve().parent.parent / "sae_weights" / "scenes-llava-next"


@pytest.mark.skipif(not SCENES_SAE.exists(), reason="the scenes model's SAE is not in this checkout")
def test_the_page_on_the_scenes_model_shows_real_heatmaps_and_steers_an_answer(browser, tmp_path):
    """The scenes model with its shipped SAE and catalog: feature 324 (red objects) opens with its top
    images' heatmaps; in the playground, with the README's scene uploaded, clamping it on the image
    turns "yellow" into "red" beside the unsteered answer; inspecting the scene draws its heatmaps."""
    generate(tmp_path, 4, seed=11)  # the README's scene: scene 3, a yellow circle
    scene = tmp_path / "images" / "000003.png"
    server = Server("--model", "builtin:scenes-llava-next")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{server.url}/ui#/feature/324")
        page.wait_for_function("document.querySelectorAll('#feature-images canvas').length >= 3")
        page.wait_for_function("document.querySelector('#feature-images img')?.naturalWidth > 0")
        page.screenshot(path=str(_shots() / "scenes-feature.png"), full_page=True)
        page.click("#feature-to-playground")
        page.wait_for_selector("#view-playground:not([hidden]) #play-features li")
        page.fill("#play-prompt", "What colour is the circle? Answer in a word or a short phrase.")
        page.set_input_files("#play-image", str(scene))
        page.select_option("#play-scope", "image")
        _steer(page, "150", "8")
        assert (page.text_content("#out-unsteered").strip(), page.text_content("#out-steered").strip()) == ("yellow", "red")
        page.screenshot(path=str(_shots() / "scenes-playground.png"), full_page=True)
        page.click("#nav-inspect")
        page.set_input_files("#inspect-image", str(scene))
        page.click("#inspect-form button[type=submit]")
        page.wait_for_selector("#inspect-grids canvas")
        assert "image tokens" in page.text_content("#inspect-status")
        page.screenshot(path=str(_shots() / "scenes-inspect.png"), full_page=True)
        assert page.is_hidden("#error") and errors == []
    finally:
        page.close()
        server.stop()


def test_the_page_on_the_default_model_finds_a_feature_and_steers_with_it(browser):
    """`lmm-steer serve` with no arguments (SmolLM2 and its shipped SAE and catalog): searching
    "music" finds the README's feature 1951; it is calibrated, so the playground offers a strength,
    and at strength 1 the poem turns to music beside the unsteered one."""
    from test_default_model import CONCEPTS, mentions

    server = Server()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        _search_and_open(page, server.url, "music", 1951)
        page.wait_for_function("document.querySelectorAll('#feature-contexts mark').length > 0")
        page.click("#feature-to-playground")
        page.fill("#play-prompt", "Write a short poem.")
        assert "strength" in page.text_content("#play-features")
        _steer(page, "1", "40")
        steered, plain = page.text_content("#out-steered"), page.text_content("#out-unsteered")
        assert page.is_hidden("#error"), page.text_content("#error")
        assert mentions(steered, CONCEPTS["music"]) and not mentions(plain, CONCEPTS["music"]), (steered, plain)
        assert page.is_hidden("#error")
    finally:
        page.close()
        server.stop()
