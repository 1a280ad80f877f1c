"""`tunelab webui`: the checkpoint chooser and answer streaming without a browser, and the page itself in
headless Chromium (Selenium + Debian's chromium/chromium-driver; marked `browser`, skipped without them)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from chat_helpers import free_port, make_lora

from tunelab.engine import to_messages
from tunelab.hparams import parse_args

pytest.importorskip("gradio")
from tunelab.webui import BASE_CHOICE, PASSWORD_ENV, Models, WebUIArguments, _respond, access, build_demo, find_runs  # noqa: E402,E501

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
QUERY = "Hello, how are you?"


@pytest.fixture(scope="module")
def runs_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_lora(tiny_llama_dir, root / "study" / "lora_run", source_prefix="You are Haruhi.")
    (root / "not_a_run").mkdir()
    return root


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    models = Models(parse_args(["--model_name_or_path", str(tiny_llama_dir), "--max_new_tokens", "16"]))
    models.load(BASE_CHOICE)
    return models


def test_find_runs_lists_run_folders_only(runs_dir, tmp_path):
    assert find_runs(runs_dir) == [str(runs_dir / "study" / "lora_run")]
    assert find_runs(tmp_path / "missing") == []


def test_choosing_a_checkpoint_loads_it_with_its_run_settings(models, runs_dir):
    run = find_runs(runs_dir)[0]
    engine = models.load(run)
    assert (engine.method, engine.source_prefix) == ("lora", "You are Haruhi.")
    assert models.load(run) is engine  # same choice: no reload
    assert models.load(BASE_CHOICE).method == "none"


def test_respond_streams_into_the_history(models):
    engine = models.load(BASE_CHOICE)
    updates = list(_respond(engine, QUERY, [], 16, 0.0, 0.7))
    box, history, shown = updates[-1]
    expected = engine.chat(to_messages(QUERY), max_new_tokens=16).text
    assert box == "" and history == [(QUERY, expected)]
    assert shown == [{"role": "user", "content": QUERY}, {"role": "assistant", "content": expected}]
    assert list(_respond(engine, "  ", history, 16, 0.0, 0.7))[-1][1] == history  # blank input: no turn


def _alnum(text: str) -> str:
    """Letters and digits only: what survives markdown rendering of the tiny model's byte soup unchanged."""
    return "".join(re.findall(r"[A-Za-z0-9]", text))


@pytest.fixture
def page_url(models, runs_dir):
    sock = free_port()
    port = sock.getsockname()[1]
    sock.close()  # gradio binds the port itself
    demo = build_demo(models, runs_dir)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
                        quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.mark.parametrize("host, password, env, login, warns", [
    ("127.0.0.1", None, None, None, None),
    ("127.0.0.1", "pw", None, ("tunelab", "pw"), None),
    ("127.0.0.1", None, "from-env", ("tunelab", "from-env"), None),
    ("0.0.0.0", None, None, None, "without a password"),
    ("0.0.0.0", "pw", None, ("tunelab", "pw"), "unencrypted"),
])
def test_access_login_and_bind_warning(monkeypatch, host, password, env, login, warns):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    if env:
        monkeypatch.setenv(PASSWORD_ENV, env)
    auth, warning = access(WebUIArguments(host=host, password=password))
    assert auth == login and (warning is None if warns is None else warns in warning)
    assert WebUIArguments().host == "127.0.0.1"


def test_a_password_puts_a_login_in_front(models, runs_dir):
    import httpx

    sock = free_port()
    port = sock.getsockname()[1]
    sock.close()
    demo = build_demo(models, runs_dir)
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
                        quiet=True, auth=access(WebUIArguments(password="secret"))[0])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/config").status_code == 401
            assert client.post("/login", data={"username": "tunelab", "password": "wrong"}).status_code == 400
            assert client.post("/login", data={"username": "tunelab", "password": "secret"}).status_code == 200
            assert client.get("/config").status_code == 200
    finally:
        demo.close()


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("needs Debian's chromium and chromium-driver (/usr/bin/chromium, chromedriver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no Selenium Manager download
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.mark.browser
def test_page_sends_a_message_and_shows_the_reply(browser, page_url, models):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = models.load(BASE_CHOICE).chat(to_messages(QUERY), max_new_tokens=16).text
    assert _alnum(expected), "the tiny model's answer has no letters to compare"
    browser.get(page_url)
    wait = WebDriverWait(browser, 30)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea"))
    box.send_keys(QUERY)
    browser.find_element(By.CSS_SELECTOR, "#send").click()

    def reply(driver):
        bots = driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')
        return bots and _alnum(bots[-1].text) == _alnum(expected) and bots[-1].text

    assert wait.until(reply)
    users = browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="user"]')
    assert [u.text for u in users] == [QUERY]
    assert browser.find_element(By.CSS_SELECTOR, "#query textarea").get_attribute("value") == ""
