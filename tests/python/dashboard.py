# Drives the dashboard in a real headless Chromium (Debian's, through
# Playwright): sign in, create a campaign from a CSV with a bad row, start
# it, watch the counters reach their final numbers, pause and resume a
# slower campaign, and save screenshots.
import os
import re
import sys
import tempfile

from playwright.sync_api import expect, sync_playwright

BASE = os.environ["HERALD_BASE"]
TOKEN = os.environ["HERALD_TOKEN"]
SLOW = os.environ["HERALD_SLOW_CAMPAIGN"]
SHOTS = os.environ["HERALD_SCREENSHOTS"]
os.makedirs(SHOTS, exist_ok=True)

csv = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False)
csv.write("phone,name,day\n")
for i in range(300):
    csv.write(f"+1555{i:07d},P{i},Monday\n")
csv.write("not-a-number,Bad,Friday\n")
csv.close()

with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update",
              "--disable-sync"],
    )
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # Sign in: a wrong key is refused, the right one lands on the list.
    page.goto(BASE + "/")
    page.fill("#apikey", "hk_wrong")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    page.fill("#apikey", TOKEN)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_contain_text("Campaigns")

    # Create from a CSV, with a live preview and a per-row error report.
    page.goto(BASE + "/#/new")
    page.fill("#name", "Dashboard test")
    page.fill("#template", "Hi {{name}}, see you {{day}}")
    page.set_input_files("#csv", csv.name)
    expect(page.locator("#preview")).to_have_text("Hi P0, see you Monday")
    page.click("#create button[type=submit]")
    report = page.locator("#import-report")
    expect(report).to_contain_text("Imported 300")
    expect(report).to_contain_text("1 invalid")
    expect(report).to_contain_text("not-a-number")
    page.click("#open-campaign")
    expect(page.locator("#status")).to_have_text("draft")

    # Start it and see the counters reach the final numbers.
    page.click("button[data-act=start]")
    expect(page.locator("#status")).to_have_text("completed", timeout=60_000)
    sent = int(page.locator('[data-stat="Sent"]').inner_text().replace(",", ""))
    failed = int(page.locator('[data-stat="Failed"]').inner_text().replace(",", ""))
    assert sent + failed == 300, (sent, failed)
    expect(page.locator("#batches")).to_contain_text("completed")
    expect(page.locator("#recipients code").first).to_have_text(re.compile(r"^\+155\*+\d\d$"))
    page.screenshot(path=os.path.join(SHOTS, "dashboard-campaign.png"), full_page=True)

    # Pause and resume a slower campaign.
    page.goto(BASE + f"/#/campaigns/{SLOW}")
    expect(page.locator("#status")).to_have_text("draft")
    page.click("button[data-act=start]")
    expect(page.locator("#status")).to_have_text("running", timeout=20_000)
    page.click("button[data-act=pause]")
    expect(page.locator("#status")).to_have_text("paused", timeout=20_000)
    page.click("button[data-act=pause]")
    expect(page.locator("#action-error")).to_contain_text("paused")
    page.click("button[data-act=resume]")
    expect(page.locator("#status")).to_have_text("completed", timeout=90_000)

    # The list shows both, and looks right at phone width too.
    page.goto(BASE + "/#/campaigns")
    expect(page.locator("h1")).to_contain_text("Campaigns")
    expect(page.locator("#view table")).to_contain_text("Dashboard test")
    expect(page.locator("#view table")).to_contain_text("Slow one")
    page.screenshot(path=os.path.join(SHOTS, "dashboard-list.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=os.path.join(SHOTS, "dashboard-phone.png"), full_page=True)
    assert not errors, errors
    browser.close()

print("dashboard ok")
sys.exit(0)
