"""The web page in a real browser: Debian's headless Chromium driven by Selenium against the app on the loopback.

Needs the system packages `chromium` and `chromium-driver` (`.ci/run` installs them with apt-get); skipped with
that reason where they are absent. CINEMO_RT_SCREENSHOT=path saves the finished page there (the README's
benchmarks/results/serve_page.png comes from this test)."""

import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="serving extras: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium: pip install -e '.[dev]'")
uvicorn = pytest.importorskip("uvicorn", reason="serving extras: pip install -e '.[serve]'")

from cinemo_rt.defaults import EXAMPLE_IMAGE  # noqa: E402
from cinemo_rt.serve.app import ServeSettings, create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
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
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,1100", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
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


def test_page_animates_the_example_photo(server_url, browser, tmp_path):
    browser.get(server_url + "/")
    wait_for(browser, "return fetch('/readyz').then(r => r.ok)")
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
    path = os.environ.get("CINEMO_RT_SCREENSHOT") or str(tmp_path / "serve_page.png")
    browser.execute_script("const v = document.getElementById('video'); v.pause(); v.currentTime = 0.5;"
                           "window.scrollTo(0, 0);")
    assert browser.save_screenshot(path)
