"""The AutoLoRA UI in a real browser (headless Chromium driven by Selenium), once per host.

Runs against the suite's SD1.5 server in its "merged" LoRA mode only (the UI does not depend on the
mode; one pass per host is enough): the controls and their ids, tooltips, a txt2img generation from
the UI with its infotext, pasting that infotext back, an X/Y/Z plot with an AutoLoRA axis, and the
img2img accordion. Three generations in all (64x64, 4 steps).

Needs `selenium` (tests/e2e/requirements.txt) and Chromium + chromedriver (`/usr/bin/chromium`,
`/usr/bin/chromedriver`, or AUTOLORA_CHROMIUM / AUTOLORA_CHROMEDRIVER); skipped without them.
AUTOLORA_SCREENSHOTS=<dir> saves `<host>-accordion.png` and `<host>-gamma-grid.png` there.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("browser e2e: selenium is not installed (.venv/bin/pip install -c constraints.txt "
                "-r tests/e2e/requirements.txt)", allow_module_level=True)


def _which(env, *candidates):
    path = os.environ.get(env)
    if path:
        return path if os.path.exists(path) else None
    return next((c for c in (shutil.which(n) if "/" not in n else n for n in candidates) if c and os.path.exists(c)),
                None)


CHROMIUM = _which("AUTOLORA_CHROMIUM", "/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
CHROMEDRIVER = _which("AUTOLORA_CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver")
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip(f"browser e2e: Chromium ({CHROMIUM or 'missing'}) and chromedriver ({CHROMEDRIVER or 'missing'}) "
                f"are both needed (apt-get install chromium chromium-driver, or set AUTOLORA_CHROMIUM / "
                f"AUTOLORA_CHROMEDRIVER)", allow_module_level=True)

ARCH = "sd15"
MODE = "merged"  # both hosts have it; the module runs once per host
WAIT_UI = 300  # page load and UI round trips on a busy 2-core CPU machine
WAIT_GENERATION = 600
SIZE, STEPS, SEED, SAMPLER = 64, 4, 12345, "Euler a"  # as in test_sd15.py

# What the generation sets in the UI: control name -> value, and the infotext each must produce.
UI_VALUES = {"gamma": 1.2, "w1": 5, "w2": 6, "lora_scale": 0.8, "start": 0.25, "end": 0.75, "cap": 1.5,
             "base_strength": 0.25}
ADVANCED_VALUES = {"schedule_power": 2, "schedule_floor": 0.25, "hr_gamma": 2}  # sliders in the Advanced accordion
EXPECTED_INFOTEXT = ["AutoLoRA gamma: 1.2", "AutoLoRA w1: 5", "AutoLoRA w2: 6", "AutoLoRA LoRA scale: 0.8",
                     "AutoLoRA start: 0.25", "AutoLoRA end: 0.75", "AutoLoRA strategy: sequential",
                     "AutoLoRA cap: 1.5", "AutoLoRA base strength: 0.25", "AutoLoRA schedule: middle",
                     "AutoLoRA schedule power: 2", "AutoLoRA schedule floor: 0.25", "AutoLoRA hires gamma: 2"]
STRATEGY = "sequential"  # set in the Advanced accordion (not the default "auto"), pasted back too
SCHEDULE = "middle"
GAMMA_AXIS = "[AutoLoRA] γ (AutoLoRA scale)"  # lib_autolora.params.xyz_label(gamma)
GAMMA_VALUES = "1, 1.5"


@dataclass(frozen=True)
class HostUI:
    """The one place for DOM differences between the hosts' gradio versions.

    A1111 1.10.1 (gradio 3.41) and Forge (gradio 4.40) turned out to need the same selectors for
    everything used here: the ids (elem_id), InputAccordion's `.label-wrap.open` and
    `<id>-visible-checkbox` (the same javascript/inputAccordion.js), the toolbar's `#paste`, the
    sliders' `input[type=number]` / `input[type=range]`. A host that differs overrides a field."""

    gradio: str
    dropdown_input: str = "input"  # the text input of a gr.Dropdown, inside its elem_id
    dropdown_option: str = "ul.options li"  # one option of the open list, inside the dropdown's elem_id
    gallery_images: str = "#txt2img_gallery img:not(.livePreview img)"  # result images, not the live preview



# -- JavaScript run in the page ------------------------------------------------------------------------

# Set an <input>/<textarea> the way typing does for gradio: the native value setter, then the
# `input` event (Svelte's bind:value) and `change` (gradio's sliders/number boxes clamp and emit on it).
JS_SET_VALUE = """
const [el, value] = arguments;
const proto = el.tagName === 'TEXTAREA' ? HTMLTextAreaElement.prototype : HTMLInputElement.prototype;
Object.getOwnPropertyDescriptor(proto, 'value').set.call(el, value);
el.dispatchEvent(new Event('input', {bubbles: true}));
el.dispatchEvent(new Event('change', {bubbles: true}));
"""
# The title the browser shows for the element under the mouse: the nearest `title` up its ancestors.
JS_HOVER_TITLE = """
const hovered = Array.from(document.querySelectorAll(':hover'));
let el = hovered[hovered.length - 1] || null;
const tag = el ? el.tagName + (el.id ? '#' + el.id : '') : null;
while (el && !(el.getAttribute && el.getAttribute('title'))) el = el.parentElement;
return [tag, el ? el.getAttribute('title') : null];
"""
JS_IMAGES = """
return Array.from(document.querySelectorAll(arguments[0]))
    .filter(img => img.complete && img.naturalWidth > 0)
    .map(img => [img.currentSrc || img.src, img.naturalWidth, img.naturalHeight]);
"""


# -- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ui(request, host, mode):
    """The suite's WebUI server, only in MODE (the other modes skip before a server is asked for;
    `host` is named here so that conftest parametrizes this module by host)."""
    if mode != MODE:
        pytest.skip(f"the browser tests run once per host, in its {MODE!r} LoRA mode")
    webui = request.getfixturevalue("webui")
    params = _params_table(webui)
    webui.browser_state = {}
    return webui, {p["name"]: p for p in params}


@pytest.fixture(scope="module")
def driver(ui):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1600,2400", "--force-device-scale-factor=1", "--lang=en-US",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--metrics-recording-only",
                # loopback only: every other host name fails at once, no proxy
                "--proxy-server=direct://", "--proxy-bypass-list=*",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost"):
        options.add_argument(arg)
    try:
        drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        pytest.skip(f"browser e2e: Chromium did not start: {exc.msg or exc}")
    drv.set_page_load_timeout(WAIT_UI)
    drv.set_script_timeout(WAIT_UI)
    yield drv
    drv.quit()


@pytest.fixture
def page(ui, driver):
    """A freshly loaded UI (every control at its default)."""
    webui, table = ui
    load(driver, webui.url)
    return Page(driver, webui, table)


# -- the page ------------------------------------------------------------------------------------------

def load(driver, url):
    driver.get(url)
    # InputAccordion's checkbox is made by the WebUI's onUiLoaded callbacks: the UI is ready.
    WebDriverWait(driver, WAIT_UI).until(
        lambda d: d.find_elements(By.ID, "autolora_txt2img_enabled-visible-checkbox"),
        "the WebUI page did not finish loading (no AutoLoRA accordion checkbox)")


class Page:
    def __init__(self, driver, webui, table):
        self.d, self.webui, self.table = driver, webui, table
        self.host = HostUI(gradio=webui.host.spec.gradio)
        self.lora = webui.models["lora"].stem

    # elements
    def wait(self, condition, message, timeout=WAIT_UI):
        def safe(d):
            try:
                return condition(d)
            except StaleElementReferenceException:  # gradio re-rendered it; try again
                return False
        return WebDriverWait(self.d, timeout, poll_frequency=0.25).until(safe, message)

    def css(self, selector, root=None):
        return (root or self.d).find_element(By.CSS_SELECTOR, selector)

    def by_id(self, elem_id):
        return self.d.find_element(By.ID, elem_id)

    def control(self, name, tab="txt2img"):
        return self.by_id(f"autolora_{tab}_{name}")

    def number_input(self, name, tab="txt2img"):
        return self.css("input[type=number]", self.control(name, tab))

    def accordion_checkbox(self, tab="txt2img"):
        return self.by_id(f"autolora_{tab}_enabled-visible-checkbox")

    def accordion_open(self, elem_id):
        return "open" in (self.css(".label-wrap", self.by_id(elem_id)).get_attribute("class") or "").split()

    def scroll_to(self, el):
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        return el

    # input
    def set_value(self, el, value):
        self.d.execute_script(JS_SET_VALUE, el, str(value))

    def set_slider(self, elem_id, value):
        box = self.css("input[type=number]", self.by_id(elem_id))
        self.set_value(box, value)
        self.wait(lambda d: _same_number(box.get_attribute("value"), value) and _same_number(
            self.css("input[type=range]", self.by_id(elem_id)).get_attribute("value"), value),
            f"#{elem_id} did not take the value {value}")

    def unset_box(self, name, tab="txt2img"):
        return self.css("input[type=checkbox]", self.control(f"{name}_unset", tab))

    def set_box(self, name, ticked: bool, tab="txt2img"):
        """Tick or untick an optional control's "unset" box (follow CFG / no cap / first pass's γ)."""
        box = self.scroll_to(self.unset_box(name, tab))
        if box.is_selected() != ticked:
            box.click()
        self.wait(lambda d: self.unset_box(name, tab).is_selected() == ticked, f"{name}: the box did not change")

    def set_text(self, selector, text):
        box = self.css(selector)
        self.set_value(box, text)
        self.wait(lambda d: box.get_attribute("value") == text, f"{selector} did not take the text")

    def choose(self, selector, label):
        """Pick `label` in the gr.Dropdown at `selector` the way a user does: open it, click the option."""
        root = self.scroll_to(self.css(selector))
        box = self.css(self.host.dropdown_input, root)
        box.click()

        def option(d):
            for li in root.find_elements(By.CSS_SELECTOR, self.host.dropdown_option):
                if li.text.replace("✓", "").strip() == label:
                    return li
            return None
        self.scroll_to(self.wait(option, f"{selector}: no option {label!r}")).click()
        self.wait(lambda d: box.get_attribute("value") == label, f"{selector} did not select {label!r}")
        self.d.execute_script("arguments[0].blur();", box)
        options = lambda: root.find_elements(By.CSS_SELECTOR, self.host.dropdown_option)
        self.wait(lambda d: not any(li.is_displayed() for li in options()),
                  f"{selector}: the option list stays open")

    def open_autolora(self, tab="txt2img"):
        """Open the accordion by its header, as a user does; InputAccordion ticks its checkbox then."""
        header = self.scroll_to(self.css(".label-wrap", self.by_id(f"autolora_{tab}_enabled")))
        header.click()
        self.wait(lambda d: self.accordion_open(f"autolora_{tab}_enabled"), "the AutoLoRA accordion did not open")
        box = self.accordion_checkbox(tab)
        if not box.is_selected():
            box.click()
        self.wait(lambda d: self.accordion_checkbox(tab).is_selected(), "AutoLoRA could not be enabled")

    def set_basics(self, prompt):
        self.set_text("#txt2img_prompt textarea", prompt)
        self.set_slider("txt2img_width", SIZE)
        self.set_slider("txt2img_height", SIZE)
        self.set_slider("txt2img_steps", STEPS)
        self.choose("#txt2img_sampling", SAMPLER)
        seed = self.css("#txt2img_seed input")
        self.set_value(seed, SEED)
        self.wait(lambda d: _same_number(seed.get_attribute("value"), SEED), "the seed did not take")

    # generation
    def images(self):
        return self.d.execute_script(JS_IMAGES, self.host.gallery_images)

    def infotext(self):
        return self.css("#html_info_txt2img").text

    def error(self):
        """The error the host shows under the gallery (e.g. NansException), or ''."""
        text = self.css("#html_log_txt2img").text
        return text if re.search(r"Error|Exception", text) else ""

    def generate(self):
        """Click Generate and wait for a new image and its infotext; returns (images, infotext)."""
        before = {src for src, _, _ in self.images()}
        info_before = self.infotext()
        button = self.by_id("txt2img_generate")
        self.scroll_to(button).click()

        def done(d):
            error = self.error()
            if error:
                raise AssertionError(f"the generation failed: {error}\nserver log tail:\n{_log_tail(self.webui)}")
            fresh = [img for img in self.images() if img[0] not in before]
            info = self.infotext()
            return (fresh, info) if fresh and info and info != info_before and button.is_displayed() else False
        try:
            return self.wait(done, "", timeout=WAIT_GENERATION)
        except TimeoutException:
            raise AssertionError(f"no new image within {WAIT_GENERATION} s; infotext: {self.infotext()!r}; "
                                 f"server log tail:\n{_log_tail(self.webui)}") from None

    def screenshot(self, el, name):
        folder = os.environ.get("AUTOLORA_SCREENSHOTS")
        if not folder:
            return None
        path = Path(folder) / f"{self.webui.host_name}-{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.scroll_to(el)
        assert el.screenshot(str(path)), f"could not save {path}"
        return path


def _params_table(webui, timeout=120):
    """GET /autolora/v1/params; the extension adds its routes in on_app_started, a moment after the
    host's own API (which the harness waits for) answers."""
    deadline = time.time() + timeout
    while True:
        try:
            return webui.get("/autolora/v1/params")["params"]
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.time() > deadline:
                raise
        time.sleep(1)


def _same_number(text, value):
    try:
        return abs(float(text) - float(value)) < 1e-9
    except (TypeError, ValueError):
        return False


def _log_tail(webui):
    server = getattr(webui, "server", None)
    return server.log_tail(30) if server is not None else ""


# -- the tests ----------------------------------------------------------------------------------------

def test_controls_ids_and_closed_accordions(page):
    for name in page.table:
        assert page.d.find_elements(By.ID, f"autolora_txt2img_{name}"), f"no #autolora_txt2img_{name}"
    assert page.d.find_elements(By.ID, "autolora_txt2img_advanced"), "no Advanced accordion"
    assert not page.accordion_open("autolora_txt2img_advanced")
    assert_closed_input_accordion(page, "txt2img")
    assert not page.control("gamma").is_displayed(), "the γ slider is shown although the accordion is closed"
    assert _same_number(page.number_input("gamma").get_attribute("value"), page.table["gamma"]["default"])


def test_img2img_accordion_exists_closed(page):
    for name in page.table:
        assert page.d.find_elements(By.ID, f"autolora_img2img_{name}"), f"no #autolora_img2img_{name}"
    assert page.d.find_elements(By.ID, "autolora_img2img_advanced"), "no img2img Advanced accordion"
    assert_closed_input_accordion(page, "img2img")


def assert_closed_input_accordion(page, tab):
    accordion = page.by_id(f"autolora_{tab}_enabled")
    assert "input-accordion" in accordion.get_attribute("class").split()
    assert not page.accordion_open(f"autolora_{tab}_enabled"), f"{tab}: the AutoLoRA accordion is open at load"
    box = page.accordion_checkbox(tab)
    assert box.get_attribute("type") == "checkbox" and not box.is_selected(), f"{tab}: AutoLoRA enabled at load"
    header = page.css(".label-wrap", accordion)
    assert header.find_elements(By.ID, f"autolora_{tab}_enabled-visible-checkbox"), \
        f"{tab}: the enable checkbox is not in the accordion's header"
    hidden = page.css(f"#autolora_{tab}_enabled-checkbox input[type=checkbox]")  # the value gradio sends
    assert not hidden.is_selected()


def test_tooltips_from_the_parameter_table(page):
    gamma = page.table["gamma"]["tooltip"]
    assert gamma
    page.wait(lambda d: page.control("gamma").get_attribute("title") == gamma,
              "autolora.js did not set the γ control's title from /autolora/v1/params")
    for name, param in page.table.items():
        assert page.control(name).get_attribute("title") == param["tooltip"], name
        assert page.control(name, "img2img").get_attribute("title") == param["tooltip"], f"img2img {name}"
    page.open_autolora()
    label = page.css("label", page.control("gamma"))
    assert label.get_attribute("title") == gamma
    ActionChains(page.d).move_to_element(label).perform()
    hovered, title = page.wait(lambda d: (lambda r: r if r[1] else False)(d.execute_script(JS_HOVER_TITLE)),
                               "nothing with a title under the mouse")
    assert title == gamma, f"hovering {hovered} shows {title!r}"
    ActionChains(page.d).move_to_element(page.number_input("w1")).perform()
    assert page.d.execute_script(JS_HOVER_TITLE)[1] == page.table["w1"]["tooltip"]


OPTIONAL = ("w1", "w2", "cap", "hr_gamma")  # a slider over the valid range with an "unset" box beside it


def test_generate_from_the_ui_writes_the_infotext(page):
    page.open_autolora()
    for name in OPTIONAL:
        assert page.unset_box(name).is_selected() or name == "hr_gamma", f"{name}: unset by default"
        rng = page.css("input[type=range]", page.control(name))
        low, _high, _step = page.table[name]["slider"]
        assert float(rng.get_attribute("min")) == low >= page.table[name]["bounds"][0], "no invalid position"
    for name, value in UI_VALUES.items():
        if name in OPTIONAL:
            page.set_box(name, False)
        page.set_slider(f"autolora_txt2img_{name}", value)
    advanced = page.css(".label-wrap", page.by_id("autolora_txt2img_advanced"))
    page.scroll_to(advanced).click()
    page.wait(lambda d: page.control("strategy").is_displayed(), "the Advanced accordion did not open")
    page.choose("#autolora_txt2img_strategy", STRATEGY)
    for name, value in ADVANCED_VALUES.items():
        if name in OPTIONAL:
            page.set_box(name, False)
        page.set_slider(f"autolora_txt2img_{name}", value)
    page.choose("#autolora_txt2img_schedule", SCHEDULE)
    page.screenshot(page.by_id("autolora_txt2img_enabled"), "accordion")
    page.set_basics(f"a photo of a cat <lora:{page.lora}:1>")

    images, infotext = page.generate()
    assert any(w == SIZE and h == SIZE for _, w, h in images), images
    # The page generates with its own checkpoint dropdown's choice (Forge Neo's reselects on load):
    # on another checkpoint the LoRA would not apply and no step would be guided.
    assert f"Model: {page.webui.models['ckpt'].stem}," in infotext, f"not the suite's checkpoint:\n{infotext}"
    missing = [text for text in EXPECTED_INFOTEXT if text not in infotext]
    assert not missing, f"missing {missing} in the infotext:\n{infotext}"
    assert f"Steps: {STEPS}," in infotext and f"Size: {SIZE}x{SIZE}" in infotext, infotext
    stats = page.webui.stats()
    assert stats["active"] and stats["guided_steps"] > 0 and stats["strategy"] == STRATEGY, stats
    # the WebUI shows processed.comments under the infotext, in the log box
    line_under = page.css("#html_log_txt2img").text
    assert f"AutoLoRA: {stats['guided_steps']} of {STEPS} steps guided, base branch '{STRATEGY}'" in line_under, \
        f"the line under the image says what ran; it shows:\n{line_under}"
    page.webui.browser_state["infotext"] = infotext


def test_paste_restores_every_control(page):
    infotext = page.webui.browser_state.get("infotext")
    assert infotext, "needs the infotext of test_generate_from_the_ui_writes_the_infotext"
    # the page is fresh: defaults
    assert not page.accordion_checkbox().is_selected()
    assert _same_number(page.number_input("gamma").get_attribute("value"), page.table["gamma"]["default"])
    page.set_text("#txt2img_prompt textarea", infotext)
    page.scroll_to(page.css("#txt2img_tools #paste")).click()

    page.wait(lambda d: _same_number(page.number_input("gamma").get_attribute("value"), UI_VALUES["gamma"]),
              f"γ was not pasted; it shows {page.number_input('gamma').get_attribute('value')}")
    every = {**UI_VALUES, **ADVANCED_VALUES}
    shown = {name: page.number_input(name).get_attribute("value") for name in every}
    wrong = {name: v for name, v in shown.items() if not _same_number(v, every[name])}
    assert not wrong, f"pasted {every}, the sliders show {shown}"
    ticked = [name for name in OPTIONAL if page.unset_box(name).is_selected()]
    assert not ticked, f"pasted values for {OPTIONAL}, but the boxes of {ticked} say unset"
    assert page.css(page.host.dropdown_input, page.control("schedule")).get_attribute("value") == SCHEDULE
    page.wait(lambda d: page.accordion_checkbox().is_selected(), "AutoLoRA was not enabled by the paste")
    assert page.accordion_open("autolora_txt2img_enabled"), "the pasted (enabled) accordion stays closed"
    strategy = page.css(page.host.dropdown_input, page.control("strategy")).get_attribute("value")
    assert strategy == STRATEGY
    assert page.css("input[type=checkbox]", page.control("base_text_encoder")).is_selected()
    assert page.css("textarea, input", page.control("guided_loras")).get_attribute("value") == ""
    # the host's own fields were pasted as well
    assert _same_number(page.css("#txt2img_steps input[type=number]").get_attribute("value"), STEPS)


def test_a_preset_and_the_guided_lora_picker(page):
    """A preset sets γ and the schedule; ↻ offers the prompt's LoRAs and picking one writes its name
    into the guided-LoRA box (the argument the API and X/Y/Z use)."""
    page.open_autolora()
    label = "Middle ramp: γ 2"
    page.choose("#autolora_txt2img_preset", label)
    page.wait(lambda d: _same_number(page.number_input("gamma").get_attribute("value"), 2),
              "the preset did not set γ")
    assert page.css(page.host.dropdown_input, page.control("schedule")).get_attribute("value") == "middle"
    page.set_text("#txt2img_prompt textarea", f"a photo of a cat <lora:{page.lora}:1>")
    advanced = page.css(".label-wrap", page.by_id("autolora_txt2img_advanced"))
    if not page.accordion_open("autolora_txt2img_advanced"):
        page.scroll_to(advanced).click()
    page.scroll_to(page.control("guided_refresh")).click()  # gr.Button's elem_id is the <button>
    root = page.control("guided_pick")
    box = page.css(page.host.dropdown_input, root)

    def option(d):
        box.click()
        return next((li for li in root.find_elements(By.CSS_SELECTOR, page.host.dropdown_option)
                     if li.text.replace("✓", "").strip() == page.lora), False)
    page.scroll_to(page.wait(option, f"the picker does not offer {page.lora!r}")).click()
    guided = page.css("textarea, input", page.control("guided_loras"))
    page.wait(lambda d: guided.get_attribute("value") == page.lora, "picking did not fill the guided-LoRA box")
    page.screenshot(page.by_id("autolora_txt2img_enabled"), "accordion-advanced")


def test_xyz_plot_with_an_autolora_axis_renders_a_grid(page):
    page.open_autolora()
    page.set_basics(f"a photo of a cat <lora:{page.lora}:1>")
    page.choose("#txt2img_script_container #script_list", page.webui.host.spec.xyz_title)
    x_type = "script_txt2img_xyz_plot_x_type"
    page.wait(lambda d: page.by_id(x_type).is_displayed(), "the X/Y/Z plot's controls did not show")
    page.choose(f"#{x_type}", GAMMA_AXIS)
    page.set_text("#script_txt2img_xyz_plot_x_values textarea, #script_txt2img_xyz_plot_x_values input",
                  GAMMA_VALUES)

    images, infotext = page.generate()
    widest = max(images, key=lambda img: img[1])
    assert len(images) > 1 or widest[1] >= 2 * SIZE, f"no grid in the gallery: {images}"
    assert widest[1] >= 2 * SIZE and widest[2] >= SIZE, f"the grid is {widest[1]}x{widest[2]}"
    # the grid's infotext is its first cell's: γ from the axis (1), not the slider's default (1.5)
    assert re.search(r"AutoLoRA gamma: 1(,|$)", infotext, re.M), infotext
    page.screenshot(page.by_id("txt2img_gallery"), "gamma-grid")
