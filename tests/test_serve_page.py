"""The web page in a real browser: Debian's headless Chromium driven by Selenium against the app on the loopback.

Needs selenium (the `browser` extra) and the system packages `chromium` and `chromium-driver` (`.ci/run` installs
them and runs this file in its second step, `-m "ray or browser"`); skipped with that reason where they are
absent. CINEMO_RT_SCREENSHOT=path saves the finished page there (the README's benchmarks/results/serve_page.png
comes from this test)."""

import os
import shutil
import socket
import threading
import time
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium, not in the light `dev` install: "
                                "pip install -e '.[browser]'; .ci/run's second step installs and runs it")
uvicorn = pytest.importorskip("uvicorn", reason="serving extras: pip install -e '.[serve]'")

from cinemo_rt.defaults import EXAMPLE_IMAGE  # noqa: E402
from cinemo_rt.serve.app import ServeSettings, create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                       "(apt-get install chromium chromium-driver; .ci/run does)"),
]

RECORD_PROGRESS = """
window.progressSeen = [];
new MutationObserver(() => window.progressSeen.push([document.getElementById('progress').value,
                                                     document.getElementById('progress').max]))
  .observe(document.getElementById('progress'), {attributes: true});
"""


@pytest.fixture
def server_url(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(ServeSettings(jobs_dir=tmp_path / "jobs"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:  # the model loaded before the page opens: its 503s are not the page's
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5):
                break
        except OSError:
            time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,1100", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, failed loads (404s)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, script, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}\nstatus: "
                         + driver.execute_script("return document.getElementById('status').textContent"))


# What a person sees: an element counts when it takes space on the screen (not hidden, not display:none,
# not zero-sized); an image is broken when it has finished loading without pixels.
SEEN = """
const seen = (id) => { const el = document.getElementById(id); const box = el.getBoundingClientRect();
  return getComputedStyle(el).display !== 'none' && box.width > 0 && box.height > 0; };
const size = (id) => { const box = document.getElementById(id).getBoundingClientRect();
  return [Math.round(box.width), Math.round(box.height)]; };
const broken = [...document.images].filter((img) => img.getBoundingClientRect().height > 0
  && (!img.complete || img.naturalWidth === 0)).map((img) => img.id || img.alt);
return {video: seen('video'), gif: seen('gif'), download: seen('download'), warnings: seen('warnings'),
        model: seen('model'), videoSize: size('video'), gifSize: size('gif'), broken: broken};
"""


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_page_animates_the_example_photo(server_url, browser, tmp_path):
    browser.get(server_url + "/")
    browser.execute_script(RECORD_PROGRESS)
    browser.find_element("id", "image").send_keys(str(EXAMPLE_IMAGE))
    assert browser.execute_script("return !document.getElementById('preview').hidden")
    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys("the camera pans right")
    browser.execute_script("const s = document.getElementById('bucket'); s.value = 15;"
                           "s.dispatchEvent(new Event('input'));")
    assert browser.find_element("id", "bucket-value").text == "15"
    browser.execute_script("document.querySelector('[name=steps]').value = 20;"
                           "document.querySelector('[name=seed]').value = 3;")
    browser.find_element("tag name", "summary").click()  # open the advanced options
    browser.find_element("id", "fast").click()  # the preset's 20 steps and sampler, with the step cache
    assert not browser.find_element("name", "steps").is_enabled()
    browser.find_element("tag name", "summary").click()  # fold them again (the screenshot shows the video)
    browser.find_element("id", "submit").click()

    wait_for(browser, "const v = document.getElementById('video');"
                      "return !v.hidden && v.readyState >= 2 && v.duration > 0 && !v.error")
    seen = browser.execute_script("return window.progressSeen")
    values = [value for value, maximum in seen if maximum == 20]
    assert any(0 < value < 20 for value in values), seen  # the bar moved through the steps
    assert values[-1] == 20
    assert "done" in browser.find_element("id", "status").text
    calls = int(browser.find_element("id", "status").text.split("(")[1].split()[0])  # "done (N UNet calls)"
    assert 0 < calls < 40  # fewer than 20 steps with both CFG branches
    assert browser.find_element("id", "download").get_attribute("download").endswith(".mp4")
    assert "the camera pans right" in browser.find_element("id", "recent").text
    seen = browser.execute_script(SEEN)
    # the video plays at a readable size, and nothing else is on screen where the result is: no empty GIF
    # player, no broken image with its alt text (the hidden elements once showed through display:block)
    assert seen["video"] and seen["videoSize"][0] >= 300 and seen["videoSize"][1] >= 300, seen
    assert not seen["gif"] and seen["download"] and seen["broken"] == [], seen
    assert not seen["warnings"], seen  # every word of the prompt is one the demo knows
    facts = browser.find_element("id", "model").text  # the model's limits, stated above the form
    assert seen["model"] and "32x32 pixels, 9 frames" in facts and "only these words" in facts, facts
    assert console_errors(browser) == []  # no failed load (the favicon once was a 404), no script error
    path = os.environ.get("CINEMO_RT_SCREENSHOT") or str(tmp_path / "serve_page.png")
    browser.execute_script("const v = document.getElementById('video'); v.pause(); v.currentTime = 0.5;"
                           "window.scrollTo(0, 0);")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(900, height + 160)  # the whole page, the video included (window chrome aside)
    assert browser.save_screenshot(path)


def test_page_gif_result_warning_and_edit_form(server_url, browser, tmp_path):
    """A GIF result shows the image and no empty video player; a word the demo does not know is named with
    the job; the edit form sends a clip and shows the edited video."""
    import numpy as np

    from cinemo_rt.demo_data import photo, render_clip
    from cinemo_rt.video import write_video

    browser.get(server_url + "/")
    browser.find_element("id", "image").send_keys(str(EXAMPLE_IMAGE))
    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys("a dog pans left")
    browser.execute_script("document.querySelector('[name=steps]').value = 3;"
                           "document.querySelector('#form [name=format]').value = 'gif';"
                           "document.querySelector('[name=scale]').value = '4';")
    browser.find_element("id", "submit").click()
    wait_for(browser, "const g = document.getElementById('gif'); return !g.hidden && g.complete && g.naturalWidth > 0")
    seen = browser.execute_script(SEEN)
    assert seen["gif"] and not seen["video"] and seen["broken"] == [], seen
    assert seen["gifSize"][0] >= 300, seen
    assert browser.execute_script("return document.getElementById('gif').naturalWidth") == 128  # 32 x 4
    assert seen["warnings"] and "does not know 'dog'" in browser.find_element("id", "warnings").text

    clip = tmp_path / "clip.gif"
    write_video(render_clip(photo("chelsea"), "pan_left", 0.5, 12, 32, np.random.default_rng(0)), clip, fps=8,
                format="gif")
    browser.find_element("css selector", "#edit-section summary").click()
    browser.find_element("id", "edit-video").send_keys(str(clip))
    browser.find_element("id", "edit-image").send_keys(str(EXAMPLE_IMAGE))
    browser.find_element("id", "edit-prompt").send_keys("the camera pans left")
    browser.execute_script("const f = document.getElementById('edit-form');"
                           "f.querySelector('[name=steps]').value = 2; f.querySelector('[name=frames]').value = 3;")
    browser.find_element("id", "edit-submit").click()
    wait_for(browser, "const v = document.getElementById('video');"
                      "return !v.hidden && v.readyState >= 2 && v.duration > 0 && !v.error")
    seen = browser.execute_script(SEEN)
    assert seen["video"] and not seen["gif"] and not seen["warnings"] and seen["broken"] == [], seen
    assert "done" in browser.find_element("id", "status").text
    assert "edit: the camera pans left" in browser.find_element("id", "recent").text
    assert console_errors(browser) == []
