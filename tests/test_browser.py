"""The search page in a real headless browser (Debian's Chromium, driven by Selenium).

`search serve` runs as a subprocess on a planted index; the test types the planted
caption, submits, and checks that the planted video is the first result. It saves a
screenshot (SEARCH_SCREENSHOT=PATH saves it there too, e.g. docs/search_page.png).
Without Chromium it skips naming what to install; with CI=true that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests import test_search as ts
from tests import test_serve

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--window-size=1200,800"]


def _need_browser():
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
  try:
    import selenium  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    missing.append("the selenium package (pip install -r requirements-dev.txt)")
  if missing:
    msg = (f"no headless browser: missing {', '.join(missing)}; install with "
           "`apt-get install -y chromium chromium-driver` (as root)")
    if os.environ.get("CI") == "true":
      pytest.fail(msg)
    pytest.skip(msg)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(planted_index):
  _, _, _, index = planted_index
  port = _free_port()
  proc = subprocess.Popen(
      [sys.executable, "-m", "centerclip_jax.search", "serve", "--index", str(index),
       "--port", str(port), "--max_batch", "4"],
      cwd=ts.REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 900  # start-up loads the model and compiles every shape
    while True:
      assert proc.poll() is None, proc.stdout.read()
      try:
        if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
          break
      except requests.RequestException:
        pass
      assert time.time() < deadline, "serve did not become ready"
      time.sleep(0.2)
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=30)


planted_index = test_serve.planted_index


def test_page_shows_planted_video_first(server, tmp_path):
  _need_browser()
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.keys import Keys  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support import expected_conditions as ec  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in FLAGS:
    options.add_argument(flag)
  driver = webdriver.Chrome(options=options,
                            service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
  try:
    driver.get(server + "/")
    box = driver.find_element(By.ID, "q")
    box.send_keys(ts.CAPTIONS[0], Keys.ENTER)
    WebDriverWait(driver, 30).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "#results .result")))
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .result")
    assert [c.get_attribute("data-path") for c in cards][0] == test_serve.PLANTED
    assert len(cards) == 3 and cards[0].get_attribute("data-rank") == "1"
    assert test_serve.PLANTED in cards[0].text and "1.000" in cards[0].text
    # Thumbnails loaded (a decoded image has a natural width).
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"))
    status = driver.find_element(By.ID, "status").text
    assert "3 videos" in status and "brute force" in status
    cards[0].click()  # plays from /media/...
    video = driver.find_element(By.ID, "video")
    assert video.get_attribute("src").endswith("/media/sub/b.avi")
    shot = tmp_path / "search_page.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("SEARCH_SCREENSHOT"):
      shutil.copy(shot, os.environ["SEARCH_SCREENSHOT"])
  finally:
    driver.quit()
