// Drives riffusion-app in headless Chromium for scripts/app_check.sh (which sets NODE_PATH to where
// playwright-core is installed). Presses play, then watches the app's own /api/server calls and its
// "Now playing result N" log until it has played PLAYS results, stalls or runs out of time.
// Environment: APP_URL, PLAYS, TIMEOUT_S, STALL_S, SCREENSHOT, PROFILE_DIR, REQUEST_LOG, SUMMARY_JSON.
"use strict";
const fs = require("fs");
const { chromium } = require("playwright-core");

const env = (name) => {
  if (!process.env[name]) throw new Error(`${name} is not set`);
  return process.env[name];
};
const appUrl = env("APP_URL");
const plays = Number(env("PLAYS"));
const timeoutS = Number(env("TIMEOUT_S"));
const stallS = Number(env("STALL_S"));

const started = Date.now();
const seconds = () => (Date.now() - started) / 1000;
const requestLog = fs.createWriteStream(env("REQUEST_LOG"));
const responses = []; // in the order they came back: {ok, reason, s}
const played = new Set();
const pageErrors = [];
const consoleErrors = [];
let lastActivity = Date.now();

function record(ok, reason, extra) {
  responses.push({ ok, reason, s: Number(seconds().toFixed(1)) });
  requestLog.write(JSON.stringify({ n: responses.length, ok, reason, ...extra }) + "\n");
  lastActivity = Date.now();
  const mark = ok ? "served" : `FAILED (${reason})`;
  console.log(`[${seconds().toFixed(1)} s] /api/server response ${responses.length}: ${mark}`);
}

function sent(request) {
  try {
    const body = JSON.parse(request.postData());
    return { alpha: body.alpha, steps: body.num_inference_steps, seed_image_id: body.seed_image_id,
             mask_image_id: body.mask_image_id, start: body.start, end: body.end };
  } catch {
    return { body: request.postData() };
  }
}

async function onResponse(response) {
  if (!response.url().endsWith("/api/server")) {
    if (response.status() >= 400) console.log(`[${seconds().toFixed(1)} s] HTTP ${response.status()}: ${response.url()}`);
    return;
  }
  const request = sent(response.request());
  let text = "";
  try {
    text = await response.text();
  } catch (error) {
    record(false, `no body: ${error.message}`, { request });
    return;
  }
  let data = null;
  try {
    data = JSON.parse(text).data;
  } catch {
    // Next's own 500 page when the route throws (our server closed the socket or timed out)
  }
  const audioOk = data && typeof data.audio === "string" && data.audio.startsWith("data:audio/mpeg;base64,");
  const imageOk = data && typeof data.image === "string" && data.image.startsWith("data:image/jpeg;base64,");
  if (response.status() === 200 && audioOk && imageOk) {
    record(true, null, { request, duration_s: data.duration_s });
  } else {
    const reason = data && data.error ? `server: ${data.error}` : `HTTP ${response.status()}: ${text.slice(0, 200)}`;
    record(false, reason, { request });
  }
}

(async () => {
  const context = await chromium.launchPersistentContext(env("PROFILE_DIR"), {
    executablePath: "/usr/bin/chromium",
    headless: true, // playwright passes --headless itself
    viewport: { width: 1280, height: 800 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"],
  });
  const page = context.pages()[0] || (await context.newPage());
  page.on("response", onResponse);
  page.on("requestfailed", (request) => {
    if (request.url().endsWith("/api/server")) record(false, `request failed: ${request.failure().errorText}`, { request: sent(request) });
  });
  page.on("request", (request) => {
    if (request.url().endsWith("/api/server")) lastActivity = Date.now();
  });
  page.on("console", (message) => {
    if (message.type() === "error") {
      consoleErrors.push(message.text());
      console.log(`[${seconds().toFixed(1)} s] console error: ${message.text().slice(0, 300)}`);
    }
    const match = /^Now playing result\s+(\d+)/.exec(message.text());
    if (match) {
      played.add(Number(match[1]));
      console.log(`[${seconds().toFixed(1)} s] the app plays result ${match[1]}`);
    }
  });
  page.on("pageerror", (error) => {
    pageErrors.push(error.message);
    console.log(`[${seconds().toFixed(1)} s] page error: ${error.message}`);
  });
  page.on("dialog", (dialog) => dialog.accept()); // "Are you still riffing?" after 600 s of one prompt

  await page.goto(appUrl, { waitUntil: "load", timeout: 120000 });
  try {
    await page.getByTitle("Pause").click({ timeout: 60000 }); // the app starts paused; a click is the user gesture audio needs
  } catch (error) {
    pageErrors.push(`could not press play: ${error.message.split("\n")[0]}`);
  }
  let stopped = "";
  while (!stopped) {
    await page.waitForTimeout(1000);
    if (played.size >= plays) stopped = `played ${plays} results`;
    else if (seconds() > timeoutS) stopped = `time limit of ${timeoutS} s`;
    else if ((Date.now() - lastActivity) / 1000 > stallS) stopped = `no /api/server activity for ${stallS} s`;
  }
  await page.screenshot({ path: env("SCREENSHOT") });
  // Next's page when a render threw: the app is gone until reloaded
  if (await page.getByText("Application error").count()) pageErrors.push("the app shows Next's 'Application error' page");
  const firstFailure = responses.findIndex((r) => !r.ok);
  const summary = {
    stopped,
    seconds: Number(seconds().toFixed(1)),
    responses: responses.length,
    served: responses.filter((r) => r.ok).length,
    served_in_a_row: firstFailure < 0 ? responses.length : firstFailure,
    failures: responses.filter((r) => !r.ok).map((r) => r.reason),
    results_played: played.size,
    page_errors: pageErrors,
    console_errors: consoleErrors,
  };
  fs.writeFileSync(env("SUMMARY_JSON"), JSON.stringify(summary, null, 1));
  await context.close();
  requestLog.end();
})().catch((error) => {
  console.error(`driver: ${error.stack || error}`);
  process.exit(2);
});
