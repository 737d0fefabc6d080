"""`characonsist ui` in a real browser: the command starts the server and prints its address, headless Chromium
(Debian's chromium and chromium-driver, installed by scripts/test.sh) loads the page, a two-frame story is typed
in, its identity is the user's picture (a file that is not a picture is refused first, the form kept), it is
generated on the toy model with its progress and live previews shown (a preview in each image's slot before the
image), the images appear with the reconstruction's PSNR, a comic page is exported, and with "live previews" off
(kept over a reload) an image regenerated shows none.
Screenshots go under the test's temporary folder (and to $CHARACONSIST_UI_SCREENSHOTS when set, e.g. docs/img)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # a real browser and a real server process

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1440,1000"]


def _need_browser():
    missing = [str(p) for p in (CHROMIUM, DRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"{', '.join(missing)} missing: run scripts/test.sh (it installs chromium and chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture()
def server(tmp_path):
    """`characonsist ui --port 0` as a user starts it; its printed address."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "characonsist.cli", "ui", "--out", str(tmp_path / "ui"),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, address = [], None
    deadline = time.time() + 180
    while time.time() < deadline and address is None:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"characonsist ui: (http://127\.0\.0\.1:\d+/)", line)
        address = match.group(1) if match else None
    assert address, "".join(lines)
    yield address, tmp_path / "ui"
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def _browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(DRIVER)), options=options)


def _toy_picture(path: Path) -> None:
    """A user's drawing of their character: a render of the toy world's robot at 160 px (the model makes 128)."""
    import numpy as np
    from PIL import Image

    from characonsist.toy import world

    robot = world.sample_character(np.random.default_rng(3), kind="robot")
    Image.fromarray(world.render("beach", robot, "big-centre", size=160)).save(path)


def test_make_a_story_in_the_browser(server, tmp_path):
    _need_browser()
    from PIL import Image
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    address, folder = server
    copy = os.environ.get("CHARACONSIST_UI_SCREENSHOTS")   # the README's pictures: the toy model's own 20 steps
    steps = 20 if copy else 4
    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = _browser(tmp_path)
    try:
        # the page re-renders its rows while a wait polls: an element gone stale meanwhile is "not yet", not a failure
        wait = WebDriverWait(driver, 120, ignored_exceptions=(StaleElementReferenceException,))
        driver.get(address)
        wait.until(lambda d: "model toy" in d.find_element(By.ID, "model").text)
        assert driver.title == "characonsist"

        def type_in(element, text):
            element.clear()
            element.send_keys(text)

        type_in(driver.find_element(By.ID, "title"), "Robot day")
        type_in(driver.find_element(By.ID, "name"), "robot-day")
        type_in(driver.find_element(By.ID, "character"), "a robot")
        type_in(driver.find_element(By.CSS_SELECTOR, ".scene-name"), "beach")
        type_in(driver.find_element(By.CSS_SELECTOR, ".scene-background"), "a sunny beach")
        driver.find_element(By.CSS_SELECTOR, ".add-frame").click()          # identity + two frames
        rows = driver.find_elements(By.CSS_SELECTOR, ".scene .row")
        assert len(rows) == 3
        for row, action, caption in zip(rows, ["big in the middle", "small on the left", "small on the right"],
                                        ["", "Bot walks away", "Into the forest"], strict=True):
            type_in(row.find_element(By.CSS_SELECTOR, "input.action"), action)
            if caption:
                type_in(row.find_element(By.CSS_SELECTOR, "input.caption"), caption)
        type_in(rows[2].find_element(By.CSS_SELECTOR, "input.background"), "a green forest")
        rows[2].find_element(By.CSS_SELECTOR, ".reroll").click()              # a locked seed of its own
        assert rows[2].find_element(By.CSS_SELECTOR, ".seed-lock").is_selected()
        type_in(driver.find_element(By.ID, "steps"), str(steps))
        assert "mixed" in driver.find_element(By.ID, "bg-info").text

        # the identity is the user's own picture: a file that is not one is refused and nothing in the form is lost
        not_picture, picture = tmp_path / "notes.png", tmp_path / "my robot.png"
        not_picture.write_text("this is not a picture")
        _toy_picture(picture)
        choose = driver.find_element(By.CSS_SELECTOR, ".picture-row input.picture-input")
        choose.send_keys(str(not_picture))
        wait.until(lambda d: "not an image PIL can read" in d.find_element(By.ID, "problems").text)
        assert "notes.png" in driver.find_element(By.ID, "problems").text
        assert driver.find_element(By.ID, "title").get_attribute("value") == "Robot day"
        assert [r.find_element(By.CSS_SELECTOR, "input.action").get_attribute("value")
                for r in driver.find_elements(By.CSS_SELECTOR, ".scene .row")][1] == "small on the left"
        assert not driver.find_elements(By.CSS_SELECTOR, ".picture-thumb")
        # a picture dropped on the row is taken as one chosen (a drop event carrying the file, as a drag would)
        dropped = tmp_path / "dropped.png"
        Image.open(picture).resize((96, 96)).save(dropped)
        driver.execute_script("""
            const [row, b64, name] = arguments;
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            row.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            row.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        """, driver.find_element(By.CSS_SELECTOR, ".picture-row"), base64.b64encode(dropped.read_bytes()).decode(),
            dropped.name)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".picture-name") and "dropped.png, 96x96" in
                   d.find_element(By.CSS_SELECTOR, ".picture-name").text)
        assert not driver.find_element(By.CSS_SELECTOR, ".picture-row").get_attribute("class").count("drop")
        driver.find_element(By.CSS_SELECTOR, ".picture-row input.picture-input").send_keys(str(picture))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".picture-thumb") and d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth",
            d.find_element(By.CSS_SELECTOR, ".picture-thumb")) == 160)
        assert "my robot.png, 160x160" in driver.find_element(By.CSS_SELECTOR, ".picture-name").text
        assert "the masks need the character's words" in driver.find_element(By.CSS_SELECTOR, ".picture-hint").text
        assert driver.find_element(By.ID, "live-previews").is_selected()    # on by default
        driver.find_element(By.ID, "generate").click()

        wait.until(lambda d: any(e["type"] == "done" for e in d.execute_script("return window.uiEvents")))
        assert "(ready)" in driver.find_element(By.ID, "model").text     # the header followed the model's load
        events = driver.execute_script("return window.uiEvents")
        types = [e["type"] for e in events]
        # a preview of every image came (and was put in its slot) while the group denoised, before its images
        assert "preview" in types and types.index("group_started") < types.index("preview") < types.index("group")
        first = events[types.index("preview")]
        assert [im["index"] for im in first["images"]] == [0, 1, 2] and all(im["bytes"] > 100 for im in first["images"])
        assert driver.execute_script("return window.previewsShown") >= 3
        progress = [e for e in events if e["type"] == "progress"]
        assert progress and progress[-1]["phase"] == "main" and progress[-1]["done"] == progress[-1]["total"] == steps
        assert driver.find_element(By.ID, "steps-text").text == f"main {steps}/{steps}"
        assert driver.find_element(By.ID, "progress-images").get_attribute("data-value") == "1"
        assert driver.find_element(By.ID, "progress-steps").get_attribute("data-value") == str(steps)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.image")) == 3 and all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im) == 128
            for im in d.find_elements(By.CSS_SELECTOR, "#gallery img.image")))
        assert "done" in driver.find_element(By.ID, "status").text
        assert "160x160 downscaled to 128x128" in driver.find_element(By.ID, "notes").text
        identity = driver.find_element(By.CSS_SELECTOR, '.tile[data-index="0"]')
        assert "identity (from the picture)" in identity.text
        assert re.search(r"reconstruction PSNR \d+\.\d dB · euler", identity.find_element(By.CSS_SELECTOR, ".psnr").text)
        assert driver.execute_script("return arguments[0].naturalWidth",
                                     identity.find_element(By.CSS_SELECTOR, "img.picture-source")) == 160
        driver.find_element(By.ID, "show-masks").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.mask")) == 3)
        driver.find_element(By.ID, "show-masks").click()
        assert not driver.find_elements(By.CSS_SELECTOR, "#gallery img.preview")      # the images replaced them
        driver.save_screenshot(str(shots / "ui.png"))

        Select(driver.find_element(By.ID, "export-layout")).select_by_value("2x2")
        Select(driver.find_element(By.ID, "export-format")).select_by_value("png")
        driver.find_element(By.ID, "export").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#exports img.export-preview") and d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth",
            d.find_element(By.CSS_SELECTOR, "#exports img.export-preview")) > 0)
        link = driver.find_element(By.CSS_SELECTOR, "#exports a")
        assert link.text == "layouts/2x2_01.png"
        driver.save_screenshot(str(shots / "export.png"))

        # live previews off, kept over a reload: regenerating an image shows none
        driver.find_element(By.ID, "live-previews").click()
        driver.refresh()
        wait.until(lambda d: "model toy" in d.find_element(By.ID, "model").text and d.find_elements(
            By.CSS_SELECTOR, '#gallery .tile[data-index="1"] button.regenerate'))
        assert not driver.find_element(By.ID, "live-previews").is_selected()
        driver.find_element(By.CSS_SELECTOR, '#gallery .tile[data-index="1"] button.regenerate').click()
        wait.until(lambda d: "regenerated" in d.find_element(By.ID, "status").text)
        events = driver.execute_script("return window.uiEvents")
        assert "progress" in [e["type"] for e in events] and "preview" not in [e["type"] for e in events]
        assert driver.execute_script("return window.previewsShown") == 0
    finally:
        driver.quit()
    page = folder / "robot-day" / "layouts" / "2x2_01.png"
    assert page.is_file()
    with Image.open(page) as image:
        assert image.width > 2 * 480 and image.height > 2 * 480     # two panels across, two down
    story = (folder / "robot-day" / "story.yaml").read_text()
    assert "caption: Bot walks away" in story and "background: a green forest" in story
    stored = {p.read_bytes(): p.name for p in (folder / "pictures").iterdir()}
    assert len(stored) == 2 and stored.keys() == {picture.read_bytes(), dropped.read_bytes()}   # both kept, by bytes
    assert f"image: ../pictures/{stored[picture.read_bytes()]}" in story                        # the last one chosen
    for shot in ("ui.png", "export.png"):
        assert (shots / shot).stat().st_size > 10_000
    if copy:
        shutil.copy(shots / "ui.png", Path(copy) / "ui.png")
        shutil.copy(page, Path(copy) / "ui_comic_2x2.png")
