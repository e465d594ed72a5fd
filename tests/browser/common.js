/*
 * What the browser scripts share (demo_flow.js, oidc_flow.js): starting
 * Debian's Chromium with the required flags through playwright-core (no
 * browser download), and a recorder for one run -- its steps, screenshots,
 * JavaScript errors, the secrets that must never reach a page or the
 * server's log, and the "RESULT {json}" line the pytest wrapper reads.
 */
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { chromium } = require('playwright-core');

const REQUIRED_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--no-first-run',
];
const VIEWPORT = { width: 1120, height: 760 };
const CONTEXT_OPTIONS = { viewport: VIEWPORT, locale: 'en-GB', timezoneId: 'UTC' };
const SWITCH_LIMIT_MS = 1000;

/* Chromium, headless, with the required flags.  playwright-core also makes
 * a fresh --user-data-dir for every launch and deletes it on close;
 * checkCommandLine checks both. */
function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: REQUIRED_FLAGS,
  });
}

async function checkCommandLine(browser) {
  const page = await browser.newPage();
  await page.goto('chrome://version');
  const line = await page.textContent('#command_line');
  await page.close();
  for (const flag of REQUIRED_FLAGS) {
    assert.ok(line.split(/\s+/).includes(flag), `Chromium runs with ${flag}`);
  }
  assert.match(line, /--user-data-dir=\S+/, 'Chromium runs with its own fresh --user-data-dir');
  return browser.version();
}

/* The demo page's current view: body[data-view]. */
async function view(page) {
  return page.evaluate(() => document.body.dataset.view);
}

async function waitForView(page, name, timeout = 5000) {
  await page.waitForFunction((n) => document.body.dataset.view === n, name, { timeout });
}

/* Wait until a page's long-poll is open: the page counted a poll and the
 * request is on the wire (the badge says "live"). */
async function waitForWatch(page) {
  await page.waitForFunction(
    () => window.twistauthDemo.polls > 0 && !document.getElementById('watch-badge').hidden &&
      document.getElementById('watch-badge').classList.contains('live'),
  );
  // The fetch was issued before the badge was set; give it a moment to reach the server.
  await page.waitForTimeout(150);
}

/* Wait until `watcher` switches to the signed-out view (a new signedOutAt
 * after `before`) and answer the switch time, on the performance timeline
 * that every page of one browser process shares (timeOrigin + now()). */
async function waitForSwitch(watcher, before, timeout = 5000) {
  await watcher.waitForFunction(
    (b) => window.twistauthDemo.signedOutAt !== null && window.twistauthDemo.signedOutAt !== b,
    before,
    { timeout, polling: 'raf' },
  );
  return watcher.evaluate(() => window.twistauthDemo.signedOutAt);
}

function roundMs(ms) {
  return Math.round(ms * 10) / 10;
}

/*
 * One run of a script: `recorder(ARTIFACT_DIR)`.
 *
 *   step(text)              log a step with the time since the start
 *   shoot(page, name)       ARTIFACT_DIR/name.png, full page; listed in result
 *   watchErrors(page, label)
 *                           collect JavaScript errors and console errors
 *                           (a failed resource load is expected: a 401)
 *   rememberSecrets(context)
 *                           the context's twistauth cookie values
 *   checkServerLog()        none of `secrets` is in SERVER_LOG (when set)
 *   finish()                print "RESULT {json}"
 */
function recorder(artifacts) {
  fs.mkdirSync(artifacts, { recursive: true });
  const started = Date.now();
  const result = { screenshots: [], switch_ms: {} };
  const problems = [];
  const secrets = new Set();

  function step(text) {
    console.log(`[${((Date.now() - started) / 1000).toFixed(2)} s] ${text}`);
  }

  async function shoot(page, name) {
    await page.screenshot({ path: path.join(artifacts, name + '.png'), fullPage: true });
    result.screenshots.push(name + '.png');
  }

  function watchErrors(page, label) {
    page.on('pageerror', (error) => problems.push(`${label}: ${error.message}`));
    page.on('console', (message) => {
      // Chromium logs every non-2xx response ("Failed to load resource"):
      // the 401 of a wrong password is expected.  Anything else is a problem.
      const text = message.text();
      if (message.type() === 'error' && !text.startsWith('Failed to load resource')) {
        problems.push(`${label}: console: ${text}`);
      }
    });
  }

  async function rememberSecrets(context) {
    for (const cookie of await context.cookies()) {
      if (/twistauth_session/.test(cookie.name) && cookie.value) {
        secrets.add(cookie.value);
      }
    }
  }

  function checkServerLog() {
    const file = process.env.SERVER_LOG;
    if (!file) {
      return;
    }
    const log = fs.readFileSync(file, 'utf8');
    assert.ok(log.includes('logged in'), 'the server log is the live one');
    const found = [...secrets].filter((secret) => log.includes(secret)).length;
    assert.equal(found, 0, `${found} of ${secrets.size} secrets appear in the server log`);
    result.secrets_checked_in_log = secrets.size;
  }

  function finish() {
    result.seconds = (Date.now() - started) / 1000;
    console.log('RESULT ' + JSON.stringify(result));
  }

  function fail(error) {
    console.error(error && error.stack ? error.stack : error);
    if (problems.length) {
      console.error('JavaScript errors on the pages:\n  ' + problems.join('\n  '));
    }
    process.exit(1);
  }

  return {
    result, problems, secrets, step, shoot, watchErrors, rememberSecrets, checkServerLog, finish, fail,
  };
}

module.exports = {
  CONTEXT_OPTIONS,
  REQUIRED_FLAGS,
  SWITCH_LIMIT_MS,
  VIEWPORT,
  checkCommandLine,
  launch,
  recorder,
  roundMs,
  view,
  waitForSwitch,
  waitForView,
  waitForWatch,
};
