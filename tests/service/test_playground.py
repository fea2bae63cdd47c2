"""The playground page (GET /) in a real headless browser: Debian's chromium driven by selenium over real HTTP. The
page registers a task, shows the adapter's metadata and self-check, and streams a chat answer."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.service.conftest import serve


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    chrome = webdriver.Chrome(options=options, service=DriverService(executable_path=driver))
    try:
        yield chrome
    finally:
        chrome.quit()


def test_playground_creates_a_task_and_streams_an_answer(settings_for, browser: webdriver.Chrome) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"]  # the browser may load nothing else
        assert "http://" not in page.text and "https://" not in page.text  # no external assets

        browser.get(service.url + "/")
        assert browser.title == "icm-lora playground"
        browser.find_element(By.ID, "task-id").clear()
        browser.find_element(By.ID, "task-id").send_keys("fruit-or-animal")
        browser.find_element(By.ID, "description").send_keys("Decide whether the listed words are fruits or animals.")
        browser.find_element(By.ID, "examples").send_keys(
            "kiwi pear lime => yes\nwolf goat otter => no\nfig plum => yes"
        )
        browser.find_element(By.ID, "create").click()
        wait = WebDriverWait(browser, 60)
        wait.until(ec.visibility_of_element_located((By.ID, "metadata")))
        wait.until(lambda b: "Registered fruit-or-animal" in b.find_element(By.ID, "task-status").text)

        task = client.get("/v1/tasks/fruit-or-animal").json()  # the page really registered it
        assert task["description"] == "Decide whether the listed words are fruits or animals."
        assert [e["output"] for e in task["examples"]] == ["yes", "no", "yes"]
        assert task["adapter_id"] in browser.find_element(By.ID, "metadata").text
        check = browser.find_element(By.ID, "self-check").text
        assert check.startswith("Self-check passed") or check.startswith("Self-check FAILED"), check
        assert f"{task['self_check']['examples']} examples" in check

        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("12")
        browser.find_element(By.ID, "message").send_keys("kiwi wolf")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".answer[data-done=true]"))
        answer = browser.find_elements(By.CSS_SELECTOR, ".answer")[-1]
        shown = answer.get_attribute("textContent") or ""
        assert int(answer.get_attribute("data-chunks") or 0) >= 2, "the answer arrived as a stream of chunks"
        assert browser.find_element(By.ID, "chat-status").text.startswith("finish: ")

        # the same request through the API (greedy: the page's default temperature is 0) gives the text the page showed
        direct = client.post(
            "/v1/chat/completions",
            json={
                "model": "fruit-or-animal",
                "messages": [{"role": "user", "content": "kiwi wolf"}],
                "max_tokens": 12,
                "temperature": 0,
            },
        ).json()
        assert shown and direct["choices"][0]["message"]["content"] == shown
