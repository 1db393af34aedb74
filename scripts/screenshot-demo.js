// Screenshots of `make demo` for the README (run while the demo runs):
//   cd /tmp/pw && npm install playwright-core && NODE_PATH=/tmp/pw/node_modules node scripts/screenshot-demo.js
// Uses Debian's chromium (apt-get install chromium). Not part of the test suite.
const { chromium } = require("playwright-core");

(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  const user = process.argv[2] || "ada";
  await page.goto("http://127.0.0.1:8000/hub/login");
  await page.fill("#username_input", user);
  await page.fill("#password_input", "any");
  await page.click("#login_submit");
  // the spawn page: progress bar and the Outpost's event log
  await page.waitForURL(/spawn-pending/, { timeout: 30000 }).catch(() => {});
  await page.click("details, #progress-details summary, summary").catch(() => {});
  await page.waitForTimeout(1200);
  await page.screenshot({ path: "docs/img/demo-spawn.png" });
  await page.waitForURL(/\/user\/.*\/lab/, { timeout: 60000 });
  await page.waitForTimeout(4000);
  await page.screenshot({ path: "docs/img/demo-lab.png" });
  await browser.close();
})();
