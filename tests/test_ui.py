"""The web page in a real browser (Debian's chromium driven by Playwright): search a feature, open it,
steer a prompt beside the unsteered output (on a generated scene too), inspect an image's heatmaps,
behind an API key too; nothing overflows a 1,280 px window, even with long preset descriptions.

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
# as long as the scenes presets' (about 450 characters), with a path that has nowhere to break
LONG_DESCRIPTION = ("More red: amplifies feature 3 at 30 on every token, found by a search over the explained catalog "
                    "on a development split and kept because it fixed the confusions it was chosen for; see "
                    "docs/fix.md#choosing-a-preset-strength-on-held-out-questions-lmm-steer-eval-preset-and-its-"
                    "held-out-split for its effect on a held-out split, which is much smaller than on the split "
                    "it was chosen on, and for why a clamp on every token breaks as many answers as it fixes.")


def no_overflow(page) -> bool:
    """Nothing wider than the window: the document scrolls no further than the viewport's width."""
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def failed_requests(page) -> list:
    """Collects every response of status 400 or more (a missing favicon would be one)."""
    failed = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return failed


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
    presets.write_text(json.dumps({"name": "red-up", "description": LONG_DESCRIPTION,
                                   "steering": {"features": [{"id": 3, "value": 30.0}]}}))
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
    assert '<link rel="icon" type="image/svg+xml" href="data:image/svg+xml,' in page.text  # no /favicon.ico 404
    assert httpx.get(f"{ui_server.url}/ui/static/app.js").status_code == 200
    assert httpx.get(f"{ui_server.url}/v1/models").status_code == 401
    assert "/ui" not in ui_server.get("/openapi.json").json()["paths"]


def _new_readme_scene(page) -> None:
    """Press New scene for the README's scene (seed 11, scene 3): its image is shown and its first
    question asked, with the true answer beside it."""
    page.fill("#scene-seed", "11")
    page.fill("#scene-index", "3")
    page.click("#scene-new")
    page.wait_for_function("document.getElementById('scene-image').naturalWidth > 0")
    assert page.input_value("#play-prompt") == "What colour is the circle? Answer in a word or a short phrase."
    assert page.text_content("#scene-answer-text") == "yellow"


def test_search_open_steer_and_inspect_in_a_real_browser(ui_server, browser, scene):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{ui_server.url}/ui")
    page.fill("#api-key", "secret-key")
    page.press("#api-key", "Tab")  # change event: the key is kept in session storage and used
    page.wait_for_function("document.getElementById('model-name').textContent.length > 0")
    failed = failed_requests(page)  # from here (before the key, /v1/models answered 401, as it should)
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
    stats = page.text_content("#feature-stats")
    assert "IoU of the explanation" in stats and "0.42" in stats
    assert "best possible IoU under this grounder (a bound" in stats and "0.61" in stats
    assert "best possible explanation" in stats and "red circle" in stats
    # the catalog's maximum (4) is over all tokens; its top image's grid peaks at 1.5, and the 2.0 that
    # ranks it is its example's strongest token, outside the grid
    assert "max activation over all tokens of the catalog's corpus (text and every image token)4" in stats
    assert "top image patch activation (the largest patch of its top images' base view)1.5" in stats
    caption = page.text_content("#feature-images figcaption")
    assert "peak patch 1.5" in caption and "strongest token of its example 2 (ranks it)" in caption
    assert "object" not in caption  # text and line breaks, not stringified nodes
    assert "ceiling" not in page.text_content("#view-feature").lower()
    assert "uncalibrated" in page.text_content("#feature-proposal") and "image scope" in page.text_content("#feature-proposal")
    page.screenshot(path=str(_shots() / "feature.png"))

    page.click("#feature-to-playground")
    page.wait_for_selector("#view-playground:not([hidden]) #play-features li")
    assert page.input_value("#play-scope") == "image"  # feature 3's proposal is for the image's tokens
    # a generated scene, no file: its image is shown and attached, its first question asked
    _new_readme_scene(page)
    assert "generated scene is attached" in page.text_content("#play-image-note")
    page.fill("#play-add", "sea")
    page.wait_for_function("document.querySelectorAll('#play-suggestions option').length > 0")
    page.fill("#play-add", page.eval_on_selector("#play-suggestions option", "o => o.value"))
    page.press("#play-add", "Enter")
    page.wait_for_function("document.querySelectorAll('#play-features li').length === 2")
    assert "proposed 15, calibrated" in page.text_content("#play-features li:nth-child(2)")  # feature 7's steer.value
    page.fill("#play-features li:first-child input[type=number]", "20")
    page.dispatch_event("#play-features li:first-child input[type=number]", "change")
    assert page.eval_on_selector("#play-features li:first-child input[type=range]", "r => r.value") == "20"
    page.fill("#play-max", "12")
    page.click("#play-run")
    page.wait_for_function("!document.getElementById('play-run').disabled && "
                           "document.getElementById('out-unsteered').textContent.length > 0")
    steered, plain = page.text_content("#out-steered"), page.text_content("#out-unsteered")
    assert steered and plain and steered != plain  # the clamp on the scene's image tokens changes the answer
    assert "ground truth" in page.text_content("#verdict-unsteered")  # a tiny random model: never right
    assert page.is_hidden("#error")
    # the sweep: raw values, as the sliders; it says what it holds fixed
    assert page.input_value("#sweep-values").startswith("0, ")
    assert "every other feature at its value above" in page.text_content("#sweep-note")
    page.fill("#sweep-values", "0, 40")
    page.click("#sweep-run")
    page.wait_for_function("[...document.querySelectorAll('#sweep-table td')].filter(t => t.textContent !== '…').length === 2")
    assert page.eval_on_selector_all("#sweep-table th[scope=row]", "ths => ths.map(t => t.textContent)") == ["0", "40"]
    assert "held fixed: feature 7 at 15" in page.text_content("#sweep-caption")
    # presets: the name in the list, the description as its tooltip and below it, wrapped
    assert page.eval_on_selector_all("#play-preset option", "os => os.map(o => o.textContent)") == ["none", "red-up"]
    assert page.get_attribute("#play-preset option[value=red-up]", "title") == LONG_DESCRIPTION
    page.select_option("#play-preset", "red-up")
    assert page.text_content("#play-preset-description") == LONG_DESCRIPTION
    assert no_overflow(page)
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
    assert page.text_content("#inspect-grids .heat-label").startswith("Feature ")  # each heatmap says whose it is
    assert "image tokens" in page.text_content("#inspect-status")
    # tokens as they read, the chat template's hidden until asked for
    tokens = page.eval_on_selector_all("#inspect-positions code", "cs => cs.map(c => c.textContent)")
    assert tokens and not any("Ġ" in t for t in tokens) and "<|begin_of_text|>" not in tokens
    assert "left out" in page.text_content("#inspect-pooled-note")
    page.check("#inspect-show-template")
    assert "<|begin_of_text|>" in page.eval_on_selector_all("#inspect-positions code", "cs => cs.map(c => c.textContent)")
    assert no_overflow(page)
    page.screenshot(path=str(_shots() / "inspect.png"), full_page=True)
    page.click("#inspect-grids figcaption a")
    page.wait_for_selector("#view-feature:not([hidden])")
    for view in ("features", "playground", "inspect"):
        page.click(f"#nav-{view}")
        assert no_overflow(page), view
    assert errors == [] and failed == []
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
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        _search_and_open(page, server.url, "music", 5)
        page.wait_for_function("document.getElementById('feature-explanation').textContent === 'music and songs'")
        assert page.is_hidden("#feature-images-section")  # no "Top images" heading over nothing
        assert page.is_visible("#feature-contexts-section")
        assert "(text and every image token)" not in page.text_content("#feature-stats")
        assert "Proposed value 24 (uncalibrated): 3 x the maximum activation" in page.text_content("#feature-proposal")
        page.click("#feature-to-playground")
        assert page.is_hidden("#scene-box") and page.is_hidden("#play-image-row")  # the model takes no images
        _steer(page, "60", "10")
        assert page.text_content("#out-steered") != page.text_content("#out-unsteered")
        page.click("#nav-inspect")
        assert page.is_hidden("#inspect-image-row")
        page.click("#inspect-form button[type=submit]")  # text alone: per-position features, no heatmap
        page.wait_for_selector("#inspect-positions li")
        assert page.eval_on_selector_all("#inspect-grids canvas", "cs => cs.length") == 0
        assert page.is_hidden("#error")
    finally:
        page.close()
        server.stop()


SCENES_SAE = Path(__file__).resolve().parent.parent / "sae_weights" / "scenes-llava-next"


@pytest.mark.skipif(not SCENES_SAE.exists(), reason="the scenes model's SAE is not in this checkout")
def test_the_page_on_the_scenes_model_shows_real_heatmaps_and_steers_an_answer(browser):
    """The scenes model with its shipped SAE, catalog and presets: feature 324 (red objects) opens with
    its top images' heatmaps and every number labelled with where it comes from; in the playground,
    the README's scene (scene 3 of seed 11) comes from the New scene button, the page proposes a
    value for feature 324 and runs it beside the unsteered answer and the ground truth, and at the
    README's value (150) it turns "yellow" into "red"; inspecting the scene draws its heatmaps, labelled. Nothing overflows 1,280 px."""
    server = Server("--model", "builtin:scenes-llava-next", "--presets", str(SCENES_SAE / "presets"))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    failed = failed_requests(page)
    try:
        page.goto(f"{server.url}/ui#/feature/324")
        page.wait_for_function("document.querySelectorAll('#feature-images canvas').length >= 3")
        page.wait_for_function("document.querySelector('#feature-images img')?.naturalWidth > 0")
        stats = page.text_content("#feature-stats")
        # 19.24 is the largest activation at any token of the catalog's conversations; the top images
        # (sae explain's, each shown alone) are ranked by the mean over their 64 patches
        assert "max activation over all tokens of the catalog's corpus (text and every image token)19.24" in stats
        assert "top image patch activation (the largest patch of its top images' base view)15.01" in stats
        assert "best possible IoU under this grounder (a bound" in stats
        assert "ceiling" not in page.text_content("#view-feature").lower()
        assert "mean over its 64 patches 1.59 (ranks it)" in page.text_content("#feature-images figcaption")
        calibrated = "calibrated value" in stats
        page.screenshot(path=str(_shots() / "scenes-feature.png"), full_page=True)
        page.click("#feature-to-playground")
        page.wait_for_selector("#view-playground:not([hidden]) #play-features li")
        _new_readme_scene(page)
        edit = page.text_content("#play-features li")
        assert ("calibrated" in edit) if calibrated else ("proposed 154.3 on the image scope, uncalibrated" in edit)
        assert page.input_value("#play-scope") == "image" or calibrated
        page.fill("#play-max", "8")
        page.click("#play-run")  # at the proposed value, untouched
        page.wait_for_function("!document.getElementById('play-run').disabled && "
                               "document.getElementById('out-steered').textContent.length > 0 && "
                               "document.getElementById('out-unsteered').textContent.length > 0")
        plain = page.text_content("#out-unsteered").strip()
        assert plain == "yellow" and page.text_content("#verdict-unsteered") == "· right"
        # the catalog's value for 324 comes from `sae effects` (now a screen's: one value, two scenes, too
        # weak for this answer); the README's 150 turns it
        _steer(page, "150", "8")
        steered, plain = page.text_content("#out-steered").strip(), page.text_content("#out-unsteered").strip()
        assert (plain, steered) == ("yellow", "red")
        assert page.text_content("#verdict-unsteered") == "· right"
        # the shipped presets' descriptions run to 450 characters: names in the list, nothing overflows
        assert page.eval_on_selector_all("#play-preset option", "os => os.map(o => o.value)") == [
            "", "circle-not-hexagon", "circle-not-hexagon-gated", "fitted"]
        page.select_option("#play-preset", "circle-not-hexagon-gated")
        assert page.text_content("#play-preset-description").startswith("circle-not-hexagon, gated")
        assert no_overflow(page)
        page.select_option("#play-preset", "")
        page.screenshot(path=str(_shots() / "scenes-playground.png"), full_page=True)
        page.click("#nav-inspect")  # no file chosen: the scene is inspected
        page.click("#inspect-form button[type=submit]")
        page.wait_for_selector("#inspect-grids canvas")
        assert "image tokens" in page.text_content("#inspect-status")
        assert page.text_content("#inspect-grids .heat-label").startswith("Feature ")
        assert no_overflow(page)
        page.screenshot(path=str(_shots() / "scenes-inspect.png"), full_page=True)
        assert page.is_hidden("#error") and errors == [] and failed == []
    finally:
        page.close()
        server.stop()


def test_the_page_on_the_text_model_finds_a_feature_and_steers_with_it(browser):
    """SmolLM2 and its shipped SAE and catalog: searching "music" finds the README's feature 1951; it
    is calibrated, so the playground proposes its calibrated value, and at that value the poem turns to
    music beside the unsteered one. Contexts that come from the chat template's hidden system prompt
    are marked; Inspect shows decoded tokens and hides that prompt."""
    from test_text_model import CONCEPTS, mentions

    server = Server("--model", "builtin:smollm2-135m-instruct")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        _search_and_open(page, server.url, "music", 1951)
        page.wait_for_function("document.querySelectorAll('#feature-contexts mark').length > 0")
        assert page.is_hidden("#feature-images-section")
        page.click("#feature-to-playground")
        page.fill("#play-prompt", "Write a short poem.")
        assert "calibrated" in page.text_content("#play-features") and "uncalibrated" not in page.text_content("#play-features")
        page.fill("#play-max", "40")
        page.click("#play-run")
        page.wait_for_function("!document.getElementById('play-run').disabled && "
                               "document.getElementById('out-steered').textContent.length > 0 && "
                               "document.getElementById('out-unsteered').textContent.length > 0")
        steered, plain = page.text_content("#out-steered"), page.text_content("#out-unsteered")
        assert page.is_hidden("#error"), page.text_content("#error")
        assert mentions(steered, CONCEPTS["music"]) and not mentions(plain, CONCEPTS["music"]), (steered, plain)
        # feature 150's contexts start in the template (", trained by Hugging Face user Ulv«aceae»"), and
        # feature 19 fires on the system prompt itself ("You are a helpful« AI» assistant")
        page.goto(f"{server.url}/ui#/feature/150")
        page.wait_for_selector("#feature-contexts .template")
        assert "Hugging Face user" in page.text_content("#feature-contexts .template")
        assert page.is_visible("#feature-contexts-note")
        page.goto(f"{server.url}/ui#/feature/19")
        page.wait_for_function("document.getElementById('feature-title').textContent === 'Feature 19'")
        page.wait_for_selector("#feature-contexts .badge")
        assert "fires on the chat template" in page.text_content("#feature-contexts")
        page.click("#nav-inspect")
        page.fill("#inspect-prompt", "Write a short poem about the sea.")
        page.click("#inspect-form button[type=submit]")
        page.wait_for_selector("#inspect-positions li")
        tokens = page.eval_on_selector_all("#inspect-positions code", "cs => cs.map(c => c.textContent)")
        assert "".join(tokens) == "Write a short poem about the sea."  # the hidden system prompt is not listed
        assert page.is_hidden("#error")
    finally:
        page.close()
        server.stop()
