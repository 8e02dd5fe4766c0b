// The customer portal in headless Chromium, against a running drawdown and the real broker
// (started by scripts/browser-test.sh, which passes everything below in the environment).
//
// A customer gets credits; a service opens a portal session; the page shows the meters; usage
// arrives and the balance on the page follows within seconds; "Top up" publishes a
// TopUpRequested on the topic and shows it pending; the billing system (played here) grants the
// pack with grant_id = request_id and the page shows it received. Screenshots go to OUT_DIR.
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set (run scripts/browser-test.sh)`);
  return v;
};
const BASE = env("DRAWDOWN_BASE");
const API_KEY = env("DRAWDOWN_API_KEY");
const BOOTSTRAP = env("DRAWDOWN_BOOTSTRAP");
const USAGE = env("DRAWDOWN_TOPIC_USAGE");
const GRANTS = env("DRAWDOWN_TOPIC_GRANTS");
const TOP_UPS = env("DRAWDOWN_TOPIC_TOP_UPS");
const OUT_DIR = env("OUT_DIR");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const CUSTOMER = `cus-browser-${Date.now()}`;

let passed = 0;
let failed = 0;
async function step(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    passed++;
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e.stack || e}`);
    throw e;
  }
}
function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, fn, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await sleep(100);
  }
}

// ---- Kafka through kcat (records keyed by customer, murmur2 like drawdown's producers) -------
function produce(topic, records) {
  const input = records.map((r) => `${r.customer_id}\t${JSON.stringify(r)}`).join("\n") + "\n";
  execFileSync("kcat", ["-b", BOOTSTRAP, "-P", "-t", topic, "-K", "\t",
    "-X", "topic.partitioner=murmur2_random"], { input });
}
function readTopUps() {
  const out = execFileSync("kcat", ["-b", BOOTSTRAP, "-C", "-t", TOP_UPS, "-o", "beginning", "-e", "-q",
    "-X", "isolation.level=read_committed", "-f", "%k\t%s\n"], { encoding: "utf8" });
  return out.split("\n").filter(Boolean).map((line) => {
    const [key, ...rest] = line.split("\t");
    return { key, value: JSON.parse(rest.join("\t")) };
  });
}
const usage = (from, n, name = "api_call", props = undefined) =>
  Array.from({ length: n }, (_, i) => ({
    id: `${CUSTOMER}-${name}-${from + i}`, customer_id: CUSTOMER, name,
    timestamp: new Date().toISOString(), ...(props ? { properties: props } : {}),
  }));

// ---- the API as a service ------------------------------------------------------------------
async function api(path, init = {}) {
  const r = await fetch(BASE + path, {
    ...init,
    headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json", ...(init.headers || {}) },
  });
  const body = await r.json().catch(() => null);
  return { status: r.status, body };
}

const text = async (page, sel) => (await page.locator(sel).first().textContent() || "").trim();
const meterSel = (m) => `article.card[data-meter="${m}"]`;

const profile = mkdtempSync(join(tmpdir(), "drawdown-chromium-"));
mkdirSync(OUT_DIR, { recursive: true });
let context;
try {
  await step("credits are granted", async () => {
    produce(GRANTS, [
      { type: "grant", grant_id: `${CUSTOMER}-plan`, customer_id: CUSTOMER, meter: "api_calls", amount: "100",
        kind: "cycle", subscription_id: "sub-1", expires_at: new Date(Date.now() + 30 * 86400e3).toISOString() },
      { type: "grant", grant_id: `${CUSTOMER}-tokens`, customer_id: CUSTOMER, meter: "tokens", amount: "50000",
        kind: "top_up" },
    ]);
    await until("the grants to land", async () => {
      const r = await api(`/v1/customers/${CUSTOMER}/state`);
      return r.status === 200 && r.body.meters.length === 2;
    });
  });

  let portalUrl;
  await step("a service opens a portal session", async () => {
    const r = await api("/v1/portal-sessions", {
      method: "POST", body: JSON.stringify({ customer_id: CUSTOMER, ttl: "30m" }),
    });
    assert(r.status === 201, `session: ${r.status} ${JSON.stringify(r.body)}`);
    portalUrl = r.body.url;
    assert(portalUrl.startsWith(`${BASE}/portal?token=ddp1.`), portalUrl);
  });

  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 1000 },
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = context.pages()[0] || (await context.newPage());
  const foreign = [];
  const pageErrors = [];
  page.on("request", (req) => {
    if (!req.url().startsWith(BASE) && !req.url().startsWith("data:")) foreign.push(req.url());
  });
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") pageErrors.push(m.text()); });

  await step("the portal shows every meter with balance, status, grants and movements", async () => {
    await page.goto(portalUrl);
    await page.waitForSelector(`${meterSel("api_calls")} .balance`, { timeout: 15000 });
    await until("both meters", async () => (await page.locator("article.card").count()) === 2);
    await until("balance 100", async () => (await text(page, `${meterSel("api_calls")} .balance`)) === "100");
    assert((await text(page, `${meterSel("api_calls")} .status`)) === "Active", "status Active");
    assert((await text(page, `${meterSel("tokens")} .balance`)) === "50,000", "tokens balance");
    assert((await text(page, "#customer")) === CUSTOMER, "customer shown");
    assert(!page.url().includes("token="), `the token left the address bar: ${page.url()}`);
    const grants = await text(page, `${meterSel("api_calls")} .grants`);
    assert(grants.includes(`${CUSTOMER}-plan`) && grants.includes("Plan"), `grants: ${grants}`);
  });

  await step("usage lands on the page within two seconds", async () => {
    produce(USAGE, usage(0, 30));
    const t0 = Date.now();
    await until("balance 70", async () => (await text(page, `${meterSel("api_calls")} .balance`)) === "70", 10000);
    const ms = Date.now() - t0;
    console.log(`     balance 100 -> 70 on the page after ${ms} ms`);
    assert(ms < 2500, `took ${ms} ms`);
    // The movements are a page of their own, fetched after the balance.
    await until("the usage among the movements", async () =>
      (await text(page, `${meterSel("api_calls")} .moves`)).includes("Usage"), 5000);
    produce(USAGE, usage(100, 3, "llm_completion", { tokens: 1250 }));
    await until("tokens 46,250", async () => (await text(page, `${meterSel("tokens")} .balance`)) === "46,250");
  });

  await step("the chart shows the movements and the forecast to zero, in plain words", async () => {
    const detail = (await api(`/v1/customers/${CUSTOMER}/meters/tokens`)).body;
    const dots = `${meterSel("tokens")} svg.chart circle.pt`;
    await until("a dot per movement", async () => (await page.locator(dots).count()) === detail.recent_events.length);
    const shown = await page.locator(dots).evaluateAll((cs) =>
      cs.map((c) => [Number(c.getAttribute("data-version")), c.getAttribute("data-balance")]));
    const want = detail.recent_events.map((e) => [e.version, e.balance]).sort((a, b) => a[0] - b[0]);
    assert(JSON.stringify(shown) === JSON.stringify(want), `chart ${JSON.stringify(shown)} vs API ${JSON.stringify(want)}`);
    // 3,750 tokens within a second: about 3,750 an hour; 46,250 left last about 12 hours.
    assert(Number(detail.burn_rate) > 3700 && detail.runs_out_at > Date.now(), `burn ${detail.burn_rate} ${detail.runs_out_at}`);
    await until("the forecast line", async () =>
      (await page.locator(`${meterSel("tokens")} svg.chart line.forecast-line`).count()) === 1);
    const words = await text(page, `${meterSel("tokens")} .forecast`);
    assert(/runs out in about 1[23] hours/.test(words), `forecast: ${words}`);
    await page.locator(meterSel("tokens")).screenshot({ path: join(OUT_DIR, "portal-forecast.png") });
  });

  await step("units a reservation holds show in the what's-left bar", async () => {
    const path = `/v1/customers/${CUSTOMER}/meters/tokens/reservations`;
    const r = await api(path, { method: "POST",
      body: JSON.stringify({ reservation_id: `${CUSTOMER}-job-1`, units: "10000", ttl: "10m" }) });
    assert(r.status === 200 && r.body.status === "held", `reserve: ${r.status} ${JSON.stringify(r.body)}`);
    const held = `${meterSel("tokens")} .bar .held`;
    await until("the hold in the bar", async () =>
      (await page.locator(held).getAttribute("data-reserved")) === "10000");
    const width = await page.locator(held).evaluate((e) => e.getBoundingClientRect().width);
    assert(width > 0, `held part ${width}px wide`);
    const label = await text(page, `${meterSel("tokens")} .bar + .muted`);
    assert(label.includes("10,000 reserved"), `bar label: ${label}`);
    await until("the hold among the movements", async () =>
      (await text(page, `${meterSel("tokens")} .moves`)).includes("Held for a job"));
    await page.locator(meterSel("tokens")).screenshot({ path: join(OUT_DIR, "portal-reserved.png") });
    const d = await api(`${path}/${CUSTOMER}-job-1`, { method: "DELETE" });
    assert(d.status === 200 && d.body.status === "released", `release: ${d.status} ${JSON.stringify(d.body)}`);
    await until("the bar without the hold", async () =>
      (await page.locator(held).getAttribute("data-reserved")) === "0");
  });

  await step("the status turns low, visibly", async () => {
    produce(USAGE, usage(30, 45));
    await until("balance 25, low", async () =>
      (await text(page, `${meterSel("api_calls")} .balance`)) === "25"
      && (await text(page, `${meterSel("api_calls")} .status`)) === "Low balance");
    const cls = await page.locator(meterSel("api_calls")).getAttribute("class");
    assert(cls.includes("low"), `card class ${cls}`);
  });

  await step("movements are paginated", async () => {
    const card = page.locator(meterSel("api_calls"));
    await card.locator("button", { hasText: "Older" }).click();
    await until("page 2", async () => (await card.locator(".pager .muted").textContent()) === "page 2");
    await card.locator("button", { hasText: "Newer" }).click();
    await until("page 1", async () => (await card.locator(".pager .muted").textContent()) === "page 1");
  });

  let requestId;
  await step("Top up publishes TopUpRequested and shows it pending", async () => {
    await page.locator(`${meterSel("api_calls")} button.topup[data-pack="calls-500"]`).click();
    const pending = page.locator(`${meterSel("api_calls")} .pending[data-request-id]`);
    await pending.first().waitFor({ timeout: 10000 });
    requestId = await pending.first().getAttribute("data-request-id");
    assert(/^[0-9a-f-]{36}$/.test(requestId), `request id ${requestId}`);
    const rec = await until("the record on the topic", async () =>
      readTopUps().find((r) => r.value.request_id === requestId), 15000);
    assert(rec.key === CUSTOMER, `key ${rec.key}`);
    assert(rec.value.customer_id === CUSTOMER && rec.value.meter === "api_calls"
      && rec.value.pack === "calls-500" && rec.value.source === "portal", JSON.stringify(rec.value));
    console.log(`     ${TOP_UPS}: ${JSON.stringify(rec.value)}`);
    await page.screenshot({ path: join(OUT_DIR, "portal-pending.png"), fullPage: true });
  });

  await step("the granted pack clears the pending request", async () => {
    // The billing system charges and grants with grant_id = request_id.
    produce(GRANTS, [{ type: "grant", grant_id: requestId, customer_id: CUSTOMER, meter: "api_calls",
      amount: "500", kind: "top_up" }]);
    await until("balance 525", async () => (await text(page, `${meterSel("api_calls")} .balance`)) === "525");
    await until("pending cleared", async () =>
      (await page.locator(`${meterSel("api_calls")} .pending[data-request-id]`).count()) === 0);
    assert((await text(page, `${meterSel("api_calls")} .pending.done`)).includes("received"), "received shown");
    assert((await text(page, `${meterSel("api_calls")} .status`)) === "Active", "active again");
    await page.screenshot({ path: join(OUT_DIR, "portal.png"), fullPage: true });
  });

  await step("an exhausted meter is shown as such", async () => {
    produce(USAGE, usage(200, 40, "llm_completion", { tokens: 1250 }));
    await until("tokens exhausted", async () =>
      (await text(page, `${meterSel("tokens")} .status`)) === "Exhausted");
    assert((await text(page, `${meterSel("tokens")} .balance`)) === "0", "block mode floors at 0");
    await page.screenshot({ path: join(OUT_DIR, "portal-exhausted.png"), fullPage: true });
  });

  await step("the page loaded nothing from elsewhere and raised no errors", async () => {
    assert(foreign.length === 0, `foreign requests: ${foreign}`);
    assert(pageErrors.length === 0, `page errors: ${pageErrors}`);
  });

  await step("an invalid link says so", async () => {
    const p2 = await context.newPage();
    await p2.goto(`${BASE}/portal?token=ddp1.invalid.token`);
    await p2.waitForSelector("#notice:not([hidden])", { timeout: 10000 });
    assert((await text(p2, "#notice")).includes("expired or is not valid"), "notice");
    await p2.close();
  });
} catch (e) {
  // reported by step()
} finally {
  if (context) await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(`screenshots: ${OUT_DIR}/portal.png, portal-pending.png, portal-exhausted.png, portal-forecast.png, portal-reserved.png`);
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
