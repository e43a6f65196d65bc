"""The chat page (gateway/static/index.html) in headless Chromium, driven by Playwright.

Run by chatfleet/tests/browser.rs against a running fleet:

    page_test.py --base http://127.0.0.1:PORT --chromium /usr/bin/chromium --cases send,stop,...

Each case prints `PASS <case>` or `FAIL <case>: <why>`; the exit status is 1 if any failed.
The gateway-restart case asks the test that started it to stop and start the gateway: it
prints `STOP_GATEWAY` and waits for a line on stdin, then `START_GATEWAY` and waits again.
"""

import argparse
import json
import re
import sys
import time
import traceback

from playwright.sync_api import expect, sync_playwright

REPLY_WITHIN_MS = 30_000


def ask(command):
    """Asks the test process to act on the fleet, and waits until it has."""
    print(command, flush=True)
    answer = sys.stdin.readline().strip()
    if not answer:
        raise AssertionError(f"no answer to {command}")


def normalized(text):
    return re.sub(r"\s+", " ", text).strip()


class Page:
    def __init__(self, page, base):
        self.page = page
        self.base = base
        self.dialogs = []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def new_chat(self):
        self.page.get_by_role("button", name="New chat", exact=True).click()
        expect(self.page.locator("#messages > li")).to_have_count(0)

    def send(self, text):
        box = self.page.get_by_label("Message", exact=True)
        box.fill(text)
        box.press("Enter")
        expect(box).to_have_value("")

    def last_reply(self):
        return self.page.locator("#messages > li.msg.assistant").last

    def wait_for_partial_reply(self, chars=20):
        """Waits until the newest reply has some text and is still streaming."""
        self.page.wait_for_function(
            """(n) => { const r = [...document.querySelectorAll('#messages > li.msg.assistant')].pop();
                        return r && r.dataset.state === 'streaming' && r.querySelector('.text').textContent.length >= n; }""",
            arg=chars,
            timeout=REPLY_WITHIN_MS,
        )

    def wait_for_done(self):
        expect(self.last_reply()).to_have_attribute("data-state", "done", timeout=REPLY_WITHIN_MS)
        return self.last_reply().locator(".text").text_content()

    def history(self):
        """The open conversation's history, from the API with the token the page stored."""
        return self.page.evaluate(
            """async () => {
                 const id = localStorage.getItem('chatfleet.current');
                 const c = JSON.parse(localStorage.getItem('chatfleet.conversations')).find((c) => c.id === id);
                 const r = await fetch(`/v1/sessions/${id}/messages`, { headers: { Authorization: 'Bearer ' + c.token } });
                 return (await r.json()).messages;
               }"""
        )

    def assert_shows_the_stored_reply(self, shown):
        """The reply on the page is the stored one: nothing missing, nothing repeated."""
        replies = [m for m in self.history() if m["role"] == "assistant"]
        assert replies, "the reply is stored"
        stored = replies[-1]["text"]
        assert normalized(shown) == normalized(stored), f"shown {shown!r}, stored {stored!r}"
        assert self.page.locator("#messages > li.msg.assistant").count() == len(replies), "one bubble per reply"


# ---------------------------------------------------------------------------------------------
# The cases.


def case_send_and_stream(p):
    p.new_chat()
    p.send("hello from the browser")
    expect(p.page.locator("#messages > li.msg.user").last).to_have_text("hello from the browser")
    lengths = set()
    deadline = time.monotonic() + REPLY_WITHIN_MS / 1000
    while time.monotonic() < deadline:
        state = p.last_reply().get_attribute("data-state")
        lengths.add(len(p.last_reply().locator(".text").text_content()))
        if state == "done":
            break
        time.sleep(0.05)
    shown = p.wait_for_done()
    assert len(lengths - {0}) >= 3, f"the reply grew while it streamed (lengths seen: {sorted(lengths)})"
    assert shown.startswith('You said: "hello from the browser".'), shown
    p.assert_shows_the_stored_reply(shown)
    expect(p.page.get_by_role("button", name="Stop", exact=True)).to_be_hidden()


def case_stop(p):
    p.new_chat()
    p.send("a long answer that I will stop")
    p.wait_for_partial_reply()
    stop = p.page.get_by_role("button", name="Stop", exact=True)
    expect(stop).to_be_visible()
    stop.click()
    shown = p.wait_for_done()
    expect(p.last_reply().locator(".note")).to_have_text("Stopped.")
    stored = [m for m in p.history() if m["role"] == "assistant"][-1]
    assert normalized(stored["text"]) == normalized(shown), f"shown {shown!r}, stored {stored['text']!r}"
    # Escape stops too.
    p.send("another long answer, stopped with Escape")
    p.wait_for_partial_reply()
    p.page.get_by_label("Message", exact=True).press("Escape")
    p.wait_for_done()
    expect(p.last_reply().locator(".note")).to_have_text("Stopped.")


def case_reload_mid_reply(p):
    p.new_chat()
    p.send("reload while you answer")
    p.wait_for_partial_reply()
    p.page.reload()
    expect(p.page.locator("#messages > li.msg.user").last).to_have_text("reload while you answer")
    shown = p.wait_for_done()
    assert shown.startswith('You said: "reload while you answer".'), shown
    p.assert_shows_the_stored_reply(shown)


def case_gateway_restart_mid_reply(p):
    p.new_chat()
    p.send("the gateway restarts while you answer")
    p.wait_for_partial_reply()
    ask("STOP_GATEWAY")
    expect(p.page.locator("#connection")).not_to_have_attribute("data-state", "ok", timeout=10_000)
    ask("START_GATEWAY")
    shown = p.wait_for_done()
    expect(p.page.locator("#connection")).to_have_attribute("data-state", "ok", timeout=10_000)
    expect(p.page.locator("#banner")).to_be_hidden()
    assert shown.startswith('You said: "the gateway restarts while you answer".'), shown
    p.assert_shows_the_stored_reply(shown)


def case_html_shows_as_text(p):
    p.new_chat()
    evil = "<img src=x onerror=alert(1)>"
    p.send(evil)
    expect(p.page.locator("#messages > li.msg.user").last).to_have_text(evil)
    shown = p.wait_for_done()
    assert evil in shown, f"the echo shows the HTML as text: {shown!r}"
    assert p.page.locator("#messages img, #messages script").count() == 0, "no element was made from the text"
    time.sleep(0.3)
    assert not p.dialogs, f"a dialog opened: {p.dialogs}"


def case_markdown_renders(p):
    p.new_chat()
    p.send("[mock:reply=markdown] show me")
    p.wait_for_done()
    reply = p.last_reply().locator(".text")
    expect(reply.locator("strong")).to_have_text("a list")
    expect(reply.locator("em")).to_have_text("emphasis")
    expect(reply.locator("p code")).to_have_text("inline <b>code</b>")
    expect(reply.locator("ul > li")).to_have_text(["first item", "second item with emphasis"])
    expect(reply.locator("ol > li")).to_have_text(["one", "two"])
    code = reply.locator("pre > code")
    expect(code).to_have_text('fn main() { println!("<script>alert(1)</script>"); }')
    expect(code).to_have_attribute("data-lang", "rust")
    link = reply.locator("a")
    expect(link).to_have_count(1)
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    expect(reply.locator("blockquote")).to_contain_text("A quote with a bad link and <img src=x onerror=alert(2)>.")
    assert reply.locator("img, script, b").count() == 0, "raw HTML stayed text"
    time.sleep(0.3)
    assert not p.dialogs, f"a dialog opened: {p.dialogs}"


def case_past_conversations(p):
    p.new_chat()
    p.send("first conversation")
    p.wait_for_done()
    p.new_chat()
    p.send("second conversation")
    p.wait_for_done()
    items = p.page.locator("#conversations li")
    assert items.count() >= 2, items.count()
    p.page.get_by_role("button", name="first conversation", exact=True).click()
    expect(p.page.locator("#messages > li.msg.user")).to_have_text(["first conversation"])
    expect(p.last_reply()).to_have_attribute("data-state", "done")
    expect(p.page.locator('#conversations [aria-current="true"]').first).to_contain_text("first conversation")


CASES = {
    "send": case_send_and_stream,
    "stop": case_stop,
    "reload": case_reload_mid_reply,
    "gateway_restart": case_gateway_restart_mid_reply,
    "html": case_html_shows_as_text,
    "markdown": case_markdown_renders,
    "conversations": case_past_conversations,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--chromium", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--screenshot", help="a PNG of the page after the last case")
    args = parser.parse_args()
    failed = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"], headless=True)
        context = browser.new_context(viewport={"width": 1100, "height": 760})
        page = context.new_page()
        console = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"page error: {e}"))
        page.goto(args.base + "/")
        p = Page(page, args.base)
        for name in args.cases.split(","):
            try:
                CASES[name](p)
                print(f"PASS {name}", flush=True)
            except Exception as e:  # noqa: BLE001 - every failure is reported with its case
                failed += 1
                print(f"FAIL {name}: {e}", flush=True)
                traceback.print_exc()
        errors = [c for c in console if c.startswith("page error")]
        if errors:
            failed += 1
            print(f"FAIL page errors: {json.dumps(errors)}", flush=True)
        if args.screenshot:
            page.screenshot(path=args.screenshot)
        browser.close()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
