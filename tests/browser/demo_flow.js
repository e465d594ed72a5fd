#!/usr/bin/env node
/*
 * The demo page in a real headless Chromium (Debian's, driven by
 * playwright-core; no browser download), against a running twistauth.
 *
 *   node tests/browser/demo_flow.js BASE_URL ARTIFACT_DIR
 *
 * BASE_URL is the server's root (http://localhost:PORT); the page is at
 * BASE_URL/demo.  tests/test_browser.py starts the server and runs this.
 *
 * The story, one screenshot per state (ARTIFACT_DIR/NN-name.png):
 *   01 the login page; create an account (signed in), sign out;
 *   02 a wrong password shows an error on the page;
 *   03 signed in: the user, roles and session details, the live logout watch;
 *   04 a JSON method called from the page, with its answer;
 *   05 a second page of the same browser shows the same user, and its
 *      long-poll polls again after each timed-out wait;
 *   06 "Sign out" on the second page: the first page switches to
 *      "you were signed out" without a reload -- timed;
 *   07 another browser (its own cookies, its own session) signs in as the
 *      same user and signs out everywhere: the first page switches again -- timed;
 *   08 the login page with identity-provider buttons (config.json
 *      intercepted: no provider is wired yet).
 *
 * Also: Chromium runs with the required flags; the session cookie is
 * HttpOnly and Secure; neither the session id nor the CSRF token is ever on
 * a page, nor (with SERVER_LOG=path) in the server's log, nor the password;
 * no JavaScript error on any page.
 *
 * Exits non-zero on the first failed check.  The last line of output is
 * "RESULT {json}" with the measured times, for the pytest wrapper.
 */
'use strict';

const assert = require('node:assert/strict');
const {
  CONTEXT_OPTIONS,
  SWITCH_LIMIT_MS,
  checkCommandLine,
  launch,
  recorder,
  roundMs,
  view,
  waitForSwitch,
  waitForView,
  waitForWatch,
} = require('./common');

const USER = 'ada';
const PASSWORD = 'correct horse battery staple';

const [base, artifacts] = process.argv.slice(2);
if (!base || !artifacts) {
  console.error('usage: node demo_flow.js BASE_URL ARTIFACT_DIR');
  process.exit(2);
}

const {
  result, problems, secrets, step, shoot, watchErrors, rememberSecrets, checkServerLog, finish, fail,
} = recorder(artifacts);
result.logout_answer_ms = {};
secrets.add(PASSWORD); // must never reach the page or the server's log

async function openDemo(context, label) {
  const page = await context.newPage();
  watchErrors(page, label);
  const response = await page.goto(base + '/demo');
  assert.equal(new URL(page.url()).pathname, '/demo/', 'GET /demo redirects to /demo/');
  assert.equal(response.status(), 200);
  await page.waitForFunction(() => document.body.dataset.view !== 'loading');
  return page;
}

async function fillLogin(page, userId, password) {
  await page.fill('#user-id', userId);
  await page.fill('#password', password);
}

/* Click a button on `actor` and time how long until `watcher` shows the
 * signed-out view, both on the performance timeline (shared by the pages of
 * one browser process: timeOrigin + now()). */
async function timeSwitch(actor, buttonId, watcher) {
  const before = await watcher.evaluate(() => window.twistauthDemo.signedOutAt);
  const answered = actor.waitForResponse((r) => r.url().endsWith('/api') && r.request().method() === 'POST');
  const clickedAt = await actor.evaluate((id) => {
    const t = performance.timeOrigin + performance.now();
    document.getElementById(id).click();
    return t;
  }, buttonId);
  const switchedAt = await waitForSwitch(watcher, before);
  const response = await answered;
  const timing = response.request().timing();
  return {
    switch_ms: roundMs(switchedAt - clickedAt),
    logout_answer_ms: roundMs(timing.responseEnd >= 0 ? timing.responseEnd : NaN),
  };
}

async function main() {
  const browser = await launch();
  try {
    result.chromium_version = await checkCommandLine(browser);
    step(`Chromium ${browser.version()} started with the required flags`);
    const options = CONTEXT_OPTIONS;
    const context = await browser.newContext(options);

    // 01 The login page.
    const first = await openDemo(context, 'first page');
    assert.equal(await view(first), 'login');
    assert.equal(await first.isVisible('#providers'), false, 'no provider buttons configured: none shown');
    await shoot(first, '01-login');
    step('the login page is shown');

    // Create an account: signed in at once.  Then sign out.
    await fillLogin(first, USER, PASSWORD);
    await first.click('#create-button');
    await waitForView(first, 'session');
    assert.equal(await first.textContent('#who'), USER);
    await first.click('#logout-button');
    await waitForView(first, 'login');
    assert.equal((await first.textContent('#notice')).trim(), 'You signed out.');
    step('account created (and signed in), then signed out');

    // 02 A wrong password: an error on the page, still on the login view.
    await fillLogin(first, USER, 'not the password');
    await first.click('#login-button');
    await first.waitForSelector('#login-error:not([hidden])');
    const error = await first.textContent('#login-error');
    assert.match(error, /Wrong user id or password\./);
    assert.match(error, /invalid_credentials · 40140/);
    assert.equal(await view(first), 'login');
    await shoot(first, '02-bad-credentials');
    step('a wrong password shows the error on the page');

    // 03 Sign in: the user, roles and session details; no secret on the page.
    await fillLogin(first, USER, PASSWORD);
    await first.check('#remember');
    await first.click('#login-button');
    await waitForView(first, 'session');
    assert.equal(await first.textContent('#who'), USER);
    assert.equal(await first.textContent('#roles'), 'none');
    assert.match(await first.textContent('#permanent'), /^yes/);
    assert.match(await first.textContent('#cookie-info'), /HttpOnly/);
    await waitForWatch(first);
    const cookies = await context.cookies();
    const session = cookies.find((c) => /twistauth_session$/.test(c.name));
    const csrf = cookies.find((c) => /twistauth_session_csrf$/.test(c.name));
    assert.ok(session && session.httpOnly, 'the session cookie is HttpOnly');
    assert.equal(session.path, '/');
    assert.equal(session.sameSite, 'Lax');
    assert.ok(!session.domain.startsWith('.'), 'a host-only cookie (no Domain)');
    // Secure with the __Host- prefix by default; neither with --session-cookie-secure false.
    assert.equal(session.secure, session.name.startsWith('__Host-'), 'Secure goes with __Host-');
    assert.ok(csrf && !csrf.httpOnly, 'the CSRF cookie is readable by the page');
    result.cookie_names = [session.name, csrf.name];
    await rememberSecrets(context);
    const html = await first.content();
    const text = await first.evaluate(() => document.body.innerText);
    for (const secret of [session.value, csrf.value]) {
      assert.ok(!html.includes(secret) && !text.includes(secret), 'no session id or token on the page');
    }
    await shoot(first, '03-signed-in');
    step(`signed in as ${USER}; the logout watch is open`);

    // 04 Call a JSON method from the page.
    await first.selectOption('#method', 'echo');
    await first.fill('#params', '{"hello": "world", "n": 42}');
    await first.click('#call-button');
    await first.waitForFunction(() => /HTTP 200/.test(document.getElementById('call-status').textContent));
    const answer = JSON.parse(await first.textContent('#call-result'));
    assert.deepEqual(answer, { result: { hello: 'world', n: 42 } });
    await first.selectOption('#method', 'time.now');
    await first.click('#call-button');
    await first.waitForFunction(() => /"seconds"/.test(document.getElementById('call-result').textContent));
    const now = JSON.parse(await first.textContent('#call-result')).result.seconds;
    assert.ok(Math.abs(now - Date.now() / 1000) < 60, 'time.now answers the server clock');
    await first.selectOption('#method', 'echo');
    await first.fill('#params', '{"hello": "world", "n": 42}');
    await first.click('#call-button');
    await first.waitForFunction(() => /"hello"/.test(document.getElementById('call-result').textContent));
    await shoot(first, '04-method-result');
    step('echo and time.now called from the page');

    // 05 A second page of the same browser: the same session.  It asks for
    // short waits (config.json intercepted), so its long-poll times out and
    // polls again several times while the session stays live.
    const second = await context.newPage();
    watchErrors(second, 'second page');
    await second.route('**/demo/config.json', async (route) => {
      const config = await (await route.fetch()).json();
      await route.fulfill({ json: Object.assign(config, { wait_timeout: 0.2 }) });
    });
    await second.goto(base + '/demo');
    await waitForView(second, 'session');
    assert.equal(await second.textContent('#who'), USER);
    await second.waitForFunction(() => window.twistauthDemo.polls >= 4, null, { timeout: 5000 });
    assert.equal(await view(second), 'session', 'a timed-out wait ({"logged_out": false}) keeps the page signed in');
    await waitForWatch(second);
    await shoot(second, '05-second-page');
    step('a second page shows the same user');

    // 06 Sign out on the second page: the first page switches by itself.
    await waitForWatch(first);
    const loadsBefore = await first.evaluate(() => performance.getEntriesByType('navigation').length);
    let timing = await timeSwitch(second, 'logout-button', first);
    result.switch_ms.same_browser_logout = timing.switch_ms;
    result.logout_answer_ms.same_browser_logout = timing.logout_answer_ms;
    assert.equal(await view(first), 'signed-out');
    assert.match(await first.textContent('#signed-out-why'), /another tab or window/);
    assert.equal(await first.evaluate(() => window.twistauthDemo.signedOutReason), 'logout');
    assert.equal(
      await first.evaluate(() => performance.getEntriesByType('navigation').length),
      loadsBefore,
      'the first page did not reload',
    );
    await waitForView(second, 'login');
    await shoot(first, '06-signed-out');
    step(`"Sign out" on the second page: the first page switched after ${timing.switch_ms} ms`);
    assert.ok(timing.switch_ms < SWITCH_LIMIT_MS, `switched within ${SWITCH_LIMIT_MS} ms`);

    // 07 Another browser signs in as the same user and signs out everywhere.
    await first.click('#again-button');
    await waitForView(first, 'login');
    assert.equal(await first.inputValue('#user-id'), USER);
    await first.fill('#password', PASSWORD);
    await first.click('#login-button');
    await waitForView(first, 'session');
    const other = await browser.newContext(options);
    const elsewhere = await openDemo(other, 'other browser');
    await fillLogin(elsewhere, USER, PASSWORD);
    await elsewhere.click('#login-button');
    await waitForView(elsewhere, 'session');
    await waitForWatch(first);
    await rememberSecrets(context);
    await rememberSecrets(other);
    timing = await timeSwitch(elsewhere, 'everywhere-button', first);
    result.switch_ms.other_browser_logout_everywhere = timing.switch_ms;
    result.logout_answer_ms.other_browser_logout_everywhere = timing.logout_answer_ms;
    assert.equal(await first.evaluate(() => window.twistauthDemo.signedOutReason), 'logout_everywhere');
    assert.match(await first.textContent('#signed-out-why'), /everywhere/);
    await waitForView(elsewhere, 'login');
    assert.match(await elsewhere.textContent('#notice'), /Signed out of 2 sessions\./);
    await shoot(first, '07-signed-out-everywhere');
    step(`"Sign out everywhere" in another browser: the first page switched after ${timing.switch_ms} ms`);
    assert.ok(timing.switch_ms < SWITCH_LIMIT_MS, `switched within ${SWITCH_LIMIT_MS} ms`);

    // 08 Provider buttons, as config.json will list them once OpenID
    // Connect is wired (served here by intercepting config.json): shown in
    // order, as text; a button leaving this server is dropped.
    const buttons = await browser.newContext(options);
    const withProviders = await buttons.newPage();
    watchErrors(withProviders, 'providers page');
    let providers = [
      { name: 'keycloak', label: 'Sign in with Keycloak', login_url: '/login?provider=keycloak' },
      { name: 'evil', label: 'Elsewhere', login_url: '//evil.example/login' },
      { name: 'corp', label: 'Sign in with <b>Corp</b> SSO', login_url: '/login?provider=corp' },
    ];
    await withProviders.route('**/demo/config.json', async (route) => {
      const config = await (await route.fetch()).json();
      config.providers = providers;
      await route.fulfill({ json: config });
    });
    await withProviders.goto(base + '/demo/');
    await waitForView(withProviders, 'login');
    const links = await withProviders.$$eval('#provider-list a', (as) =>
      as.map((a) => [a.textContent, a.getAttribute('href')]));
    assert.deepEqual(links, [
      ['Sign in with Keycloak', '/login?provider=keycloak'],
      ['Sign in with <b>Corp</b> SSO', '/login?provider=corp'],
    ]);
    assert.ok(await withProviders.isVisible('#providers-or'));
    assert.ok(await withProviders.isVisible('#login-form'));
    providers = [providers[0], { name: 'corp', label: 'Sign in with Corp SSO', login_url: '/login?provider=corp' }];
    await withProviders.reload();
    await waitForView(withProviders, 'login');
    assert.equal(await withProviders.locator('#provider-list a').count(), 2);
    await shoot(withProviders, '08-login-with-providers');
    await buttons.close();
    step('provider buttons from config.json are shown (and only those on this server)');

    assert.deepEqual(problems, [], 'no JavaScript errors on any page');
    checkServerLog();
    await other.close();
    await context.close();
  } finally {
    await browser.close();
  }
  finish();
}

main().catch(fail);
