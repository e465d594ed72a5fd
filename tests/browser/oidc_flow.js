#!/usr/bin/env node
/*
 * The demo page signing in through a real OpenID provider, in a real
 * headless Chromium (Debian's, driven by playwright-core; no browser
 * download).
 *
 *   node tests/browser/oidc_flow.js RP_BASE OP_ISSUER ARTIFACT_DIR
 *
 * RP_BASE is twistauth's root (http://localhost:PORT; the page is at
 * RP_BASE/demo/), configured with one provider named "op" and
 * oidc_logout_landing = "/demo/".  OP_ISSUER is panva's oidc-provider
 * from tests/op (http://127.0.0.1:PORT), whose client's redirect,
 * post-logout and back-channel URIs point at RP_BASE.
 * tests/test_browser.py starts both and runs this.
 *
 * The story, one screenshot per state (ARTIFACT_DIR/NN-name.png), in
 * browser A unless said:
 *   01 the demo's login page with the provider's button (from the real
 *      config.json);
 *   02 the button leads to the provider's development login form, filled in;
 *   03 its consent form; "Continue" returns to the demo through /redirect;
 *   04 signed in as op:alice: the page shows the user, never a token;
 *   05 oidc.session called from the page: the provider's claims (UserInfo);
 *   06 a second page signs out ("Sign out"): the first page switches -- timed;
 *      "Sign in again" with the provider button: single sign-on at the
 *      provider, no form;  browser B signs in as alice too (its own
 *      provider session);
 *   07 the second page of A opens the provider's end-session page
 *      (GET /session/end, no id_token_hint), the confirmation form;
 *   08 "Yes, sign me out" there: oidc-provider ends its session and POSTs a
 *      logout token (with sid) to /logout/backchannel before answering;
 *      the first page switches with the reason "backchannel" -- timed;
 *      browser B (another provider session) stays signed in;
 *   09 the provider's "Sign-out Success" page;
 *   10 browser B logs out at twistauth (RP-initiated: a form POST /logout
 *      with the CSRF token, from an application page the script serves on
 *      RP_BASE, since the demo's own logout is a JSON call): B's demo page
 *      switches at once -- timed; the browser goes on to the provider's
 *      confirmation, back to /logout/return (state checked) and lands on
 *      the demo's login page.  That page is served with Referrer-Policy
 *      same-origin and no CSP: under the demo's no-referrer, Chromium posts
 *      a form with "Origin: null", which twistauth refuses, and a CSP
 *      form-action 'self' blocks the redirect to the provider.
 *
 * Also: Chromium runs with the required flags; no request leaves loopback
 * (they are aborted and must all come from the provider's pages, whose
 * development views import a web font); the callback answers 303 with
 * no-store and no-referrer and the address bar never keeps a code; the
 * session cookie is HttpOnly; no code, state, ID token or session cookie
 * value reaches the server's log (SERVER_LOG); no JavaScript error on the
 * demo pages.
 *
 * Exits non-zero on the first failed check.  The last line of output is
 * "RESULT {json}" with the measured times (switch_ms; also how long the
 * provider took to answer its logout confirmation, which it does after its
 * back-channel calls), for the pytest wrapper.
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

const PROVIDER = 'op';
const SUBJECT = 'alice';
const USER_ID = `${PROVIDER}:${SUBJECT}`;
const PROVIDER_PASSWORD = 'any password at all'; // the development login takes any
const LOOPBACK = new Set(['localhost', '127.0.0.1']);

const [base, issuer, artifacts] = process.argv.slice(2);
if (!base || !issuer || !artifacts) {
  console.error('usage: node oidc_flow.js RP_BASE OP_ISSUER ARTIFACT_DIR');
  process.exit(2);
}
const rpOrigin = new URL(base).origin;
const opOrigin = new URL(issuer).origin;

const {
  result, problems, secrets, step, shoot, rememberSecrets, checkServerLog, finish, fail,
} = recorder(artifacts);
Object.assign(result, { external_requests: [], callbacks: 0, provider_forms: {} });
secrets.add(PROVIDER_PASSWORD);

/* A browser context (a browser of its own: cookies, provider session) that
 * aborts every request leaving loopback and remembers every login callback's
 * code and state as secrets. */
async function newBrowser(browser, label) {
  const context = await browser.newContext(CONTEXT_OPTIONS);
  await context.route((url) => !LOOPBACK.has(url.hostname), (route) => {
    const request = route.request();
    let from = '(no frame)';
    try {
      const page = new URL(request.frame().url());
      from = page.origin + page.pathname; // not the query: it may hold an id_token_hint
    } catch (e) {
      // a request without a frame (a worker): not the provider's page either
    }
    const url = new URL(request.url());
    result.external_requests.push({ url: url.origin + url.pathname, from });
    return route.abort();
  });
  // Checked as they happen; a failure is collected (an exception thrown in
  // an event handler would end the script without saying where).
  const check = (condition, message) => {
    if (!condition) {
      problems.push(`${label}: ${message}`);
    }
  };
  context.on('request', (request) => {
    const url = new URL(request.url());
    if (url.origin === rpOrigin && url.pathname === '/redirect') {
      result.callbacks += 1;
      for (const name of ['code', 'state']) {
        check(url.searchParams.get(name), `the callback has no ${name}`);
        secrets.add(url.searchParams.get(name));
      }
      check(url.searchParams.get('iss') === issuer, 'the callback does not name the issuer (RFC 9207)');
    }
    if (url.origin === opOrigin && url.searchParams.get('id_token_hint')) {
      secrets.add(url.searchParams.get('id_token_hint'));
    }
  });
  context.on('response', (response) => {
    const url = new URL(response.url());
    if (url.origin === rpOrigin && url.pathname === '/redirect') {
      const headers = response.headers();
      check(response.status() === 303, `the callback answered ${response.status()}, not 303`);
      check(headers['cache-control'] === 'no-store', 'the callback is not Cache-Control: no-store');
      check(headers['referrer-policy'] === 'no-referrer', 'the callback is not Referrer-Policy: no-referrer');
      check(headers.location === '/demo/', `the callback returns to ${headers.location}, not /demo/`);
    }
  });
  return context;
}

/* A demo page of `context`, loaded and past its "loading" view.  The
 * provider's pages are not ours: only the demo's own errors count. */
async function openDemo(context, label) {
  const page = await context.newPage();
  watchDemoErrors(page, label);
  await page.goto(base + '/demo/');
  await page.waitForFunction(() => document.body.dataset.view !== 'loading');
  return page;
}

function watchDemoErrors(page, label) {
  page.on('pageerror', (error) => {
    if (new URL(page.url()).origin === rpOrigin) {
      problems.push(`${label}: ${error.message}`);
    }
  });
  page.on('console', (message) => {
    const text = message.text();
    if (message.type() === 'error' && new URL(page.url()).origin === rpOrigin &&
        !text.startsWith('Failed to load resource')) {
      problems.push(`${label}: console: ${text}`);
    }
  });
}

/* Click `selector` and wait for the next document to load (after any
 * redirects). */
async function clickAndLoad(page, selector) {
  const loaded = page.waitForEvent('load');
  await page.click(selector);
  await loaded;
}

/* Click the provider's button on a demo login page and go through the
 * provider's forms (login, consent) as a user would, back to the demo.
 * `shots` names a screenshot per form.  Answers the forms met, in order. */
async function signInWithProvider(page, subject, shots = {}) {
  assert.equal(await view(page), 'login');
  const button = page.locator(`#provider-list a[data-provider="${PROVIDER}"]`);
  assert.equal(await button.getAttribute('href'), `/login?provider=${PROVIDER}&next=/demo/`);
  await clickAndLoad(page, `#provider-list a[data-provider="${PROVIDER}"]`);
  const forms = [];
  while (new URL(page.url()).origin === opOrigin) {
    assert.ok(forms.length < 3, `still at the provider after ${forms.join(', ')}`);
    assert.match(new URL(page.url()).pathname, /^\/interaction\//);
    const prompt = await page.getAttribute('form input[name="prompt"]', 'value');
    forms.push(prompt);
    if (prompt === 'login') {
      await page.fill('input[name="login"]', subject);
      await page.fill('input[name="password"]', PROVIDER_PASSWORD);
    }
    if (shots[prompt]) {
      await shoot(page, shots[prompt]);
    }
    await clickAndLoad(page, 'form button[type="submit"]');
  }
  const url = new URL(page.url());
  assert.equal(url.origin + url.pathname + url.search, `${rpOrigin}/demo/`, 'back on the demo, no code in the address bar');
  await waitForView(page, 'session');
  assert.equal(await page.textContent('#who'), `${PROVIDER}:${subject}`);
  await rememberSecrets(page.context());
  return forms;
}

/* Nothing on the page looks like a token: no JWT, no cookie value. */
async function checkNoTokens(page) {
  const html = await page.content();
  assert.ok(!/eyJ[\w-]{10,}\.[\w-]{10,}/.test(html), 'no JWT on the page');
  for (const cookie of await page.context().cookies()) {
    if (/twistauth_session/.test(cookie.name) && cookie.value) {
      assert.ok(!html.includes(cookie.value), `the ${cookie.name} value is not on the page`);
    }
  }
}

/* Run `act` (which clicks something, on any page of the same browser
 * process) and time until `watcher` switches to the signed-out view. */
async function timeSwitch(watcher, act) {
  const before = await watcher.evaluate(() => window.twistauthDemo.signedOutAt);
  const clickedAt = await act();
  const switchedAt = await waitForSwitch(watcher, before);
  return roundMs(switchedAt - clickedAt);
}

/* Click a DOM element and answer when, on the shared performance timeline. */
function clickAt(page, selector) {
  return page.evaluate((s) => {
    const t = performance.timeOrigin + performance.now();
    document.querySelector(s).click();
    return t;
  }, selector);
}

async function main() {
  const browser = await launch();
  try {
    result.chromium_version = await checkCommandLine(browser);
    step(`Chromium ${browser.version()} started with the required flags`);
    const a = await newBrowser(browser, 'browser A');

    // 01 The demo's login page, with the configured provider's button.
    const first = await openDemo(a, 'first page');
    assert.equal(await view(first), 'login');
    assert.ok(await first.isVisible('#providers'), 'the provider button is shown');
    assert.deepEqual(
      await first.$$eval('#provider-list a', (links) => links.map((l) => [l.textContent, l.getAttribute('href')])),
      [[`Sign in with ${PROVIDER}`, `/login?provider=${PROVIDER}&next=/demo/`]],
    );
    await shoot(first, '01-login-provider-button');
    step('the login page shows the provider button');

    // 02-03 The provider's login and consent forms; back on the demo.
    let started = Date.now();
    result.provider_forms.first_login = await signInWithProvider(first, SUBJECT, {
      login: '02-provider-login',
      consent: '03-provider-consent',
    });
    result.login_ms = Date.now() - started;
    assert.deepEqual(result.provider_forms.first_login, ['login', 'consent']);
    step(`signed in through the provider (login and consent forms) in ${result.login_ms} ms`);

    // 04 Signed in: the user from the provider, no token on the page.
    assert.equal(await first.textContent('#roles'), 'none');
    assert.match(await first.textContent('#cookie-info'), /HttpOnly/);
    const session = (await a.cookies()).find((c) => /twistauth_session$/.test(c.name));
    assert.ok(session && session.httpOnly && session.secure, 'the session cookie is HttpOnly and Secure');
    await waitForWatch(first);
    await checkNoTokens(first);
    await shoot(first, '04-signed-in');
    step(`signed in as ${USER_ID}; the logout watch is open`);

    // 05 A JSON method from the page: oidc.session, the provider's claims.
    await first.selectOption('#method', 'oidc.session');
    await first.fill('#params', '{}');
    await first.click('#call-button');
    await first.waitForFunction(() => /HTTP 200/.test(document.getElementById('call-status').textContent));
    const identity = JSON.parse(await first.textContent('#call-result')).result;
    assert.equal(identity.user_id, USER_ID);
    assert.equal(identity.provider, PROVIDER);
    assert.equal(identity.issuer, issuer);
    assert.equal(identity.subject, SUBJECT);
    assert.equal(identity.claims.name, `Test ${SUBJECT}`); // from UserInfo
    assert.equal(identity.claims.email, `${SUBJECT}@example.test`);
    assert.ok(identity.access_token_expires_in > 0);
    assert.deepEqual(
      Object.keys(identity).filter((k) => /token/.test(k)), ['access_token_expires_in'], 'never a token',
    );
    await checkNoTokens(first);
    await shoot(first, '05-method-result');
    step('oidc.session called from the page: the provider\'s claims');

    // 06 A second page signs out; the first page switches.
    const second = await openDemo(a, 'second page');
    assert.equal(await second.textContent('#who'), USER_ID);
    await waitForWatch(second);
    await waitForWatch(first);
    result.switch_ms.second_page_logout = await timeSwitch(first, () => clickAt(second, '#logout-button'));
    assert.equal(await first.evaluate(() => window.twistauthDemo.signedOutReason), 'logout');
    await waitForView(second, 'login');
    await shoot(first, '06-signed-out-second-page');
    step(`"Sign out" on the second page: the first page switched after ${result.switch_ms.second_page_logout} ms`);

    // Sign in again: the provider still has its session (single sign-on).
    await first.click('#again-button');
    await waitForView(first, 'login');
    started = Date.now();
    result.provider_forms.second_login = await signInWithProvider(first, SUBJECT);
    result.sso_login_ms = Date.now() - started;
    assert.deepEqual(result.provider_forms.second_login, [], 'single sign-on: no form at the provider');
    await waitForWatch(first);
    step(`signed in again by single sign-on in ${result.sso_login_ms} ms`);

    // Browser B: the same user, its own provider session.
    const b = await newBrowser(browser, 'browser B');
    const elsewhere = await openDemo(b, 'browser B');
    result.provider_forms.other_browser = await signInWithProvider(elsewhere, SUBJECT);
    assert.deepEqual(result.provider_forms.other_browser, ['login', 'consent'], 'a new provider session');
    await waitForWatch(elsewhere);
    step('browser B signed in as the same user');

    // 07 The provider's end-session page, in the second page of A.
    await second.goto(issuer + '/session/end');
    assert.ok(await second.isVisible('button[name="logout"][value="yes"]'));
    assert.equal(await second.getAttribute('form#op\\.logoutForm', 'action'), `${issuer}/session/end/confirm`);
    await shoot(second, '07-provider-logout');

    // 08 "Yes, sign me out": the provider's back-channel logout reaches
    // twistauth, and the first page switches.
    await waitForWatch(first);
    const landed = second.waitForURL(`${issuer}/session/end/success`);
    const confirmed = second.waitForResponse(
      (r) => r.url() === `${issuer}/session/end/confirm` && r.request().method() === 'POST',
    );
    result.switch_ms.provider_backchannel_logout = await timeSwitch(
      first, () => clickAt(second, 'button[name="logout"][value="yes"]'),
    );
    // oidc-provider answers the confirmation only after its back-channel
    // POSTs were answered: how long that took, as the browser saw it.
    const timing = (await confirmed).request().timing();
    result.provider_confirm_answer_ms = roundMs(timing.responseStart - timing.requestStart);
    assert.equal(await first.evaluate(() => window.twistauthDemo.signedOutReason), 'backchannel');
    assert.equal(await first.textContent('#signed-out-why'), 'Your identity provider ended your session.');
    await shoot(first, '08-signed-out-backchannel');
    step(`signed out at the provider: the first page switched after ${result.switch_ms.provider_backchannel_logout} ms`);
    await landed;
    await shoot(second, '09-provider-signed-out');

    // Browser B had its own provider session: still signed in.
    assert.equal(await view(elsewhere), 'session');
    const info = await elsewhere.evaluate(async () => (await fetch('/api', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-Twistauth-CSRF': (document.cookie.match(/__Host-twistauth_session_csrf=([^;]+)/) || [])[1] || '' },
      body: JSON.stringify({ method: 'session.info', parameters: {} }),
    })).json());
    assert.equal(info.result.user_id, USER_ID, 'only the provider session that ended was logged out');
    assert.equal(await view(elsewhere), 'session');
    step('browser B (another provider session) is still signed in');

    // 10 RP-initiated logout in browser B: a form POST /logout from an
    // application page (served here by the script), then the provider.
    const csrf = (await b.cookies()).find((c) => /twistauth_session_csrf$/.test(c.name)).value;
    const app = await b.newPage();
    await app.route(`${rpOrigin}/app/sign-out`, (route) => route.fulfill({
      status: 200,
      headers: { 'content-type': 'text/html; charset=utf-8', 'referrer-policy': 'same-origin' },
      body: '<!doctype html><title>An application page</title>' +
        '<form method="post" action="/logout">' +
        `<input type="hidden" name="csrf_token" value="${csrf}">` +
        '<button id="sign-out">Sign out here and at the provider</button></form>',
    }));
    await app.goto(`${rpOrigin}/app/sign-out`);
    await waitForWatch(elsewhere);
    const atProvider = app.waitForURL((url) => url.origin === opOrigin && url.pathname === '/session/end');
    result.switch_ms.rp_initiated_logout = await timeSwitch(elsewhere, () => clickAt(app, '#sign-out'));
    assert.equal(await elsewhere.evaluate(() => window.twistauthDemo.signedOutReason), 'logout');
    await atProvider;
    const endSession = new URL(app.url());
    assert.ok(endSession.searchParams.get('id_token_hint'), 'the end-session request carries id_token_hint');
    assert.equal(endSession.searchParams.get('post_logout_redirect_uri'), `${rpOrigin}/logout/return`);
    assert.ok(endSession.searchParams.get('state'));
    const returned = app.waitForURL(`${rpOrigin}/demo/`);
    await app.click('button[name="logout"][value="yes"]');
    await returned;
    await waitForView(app, 'login');
    await shoot(app, '10-rp-logout-landing');
    step(`RP-initiated logout in browser B: its page switched after ${result.switch_ms.rp_initiated_logout} ms, ` +
      'then the provider, then back to the demo');

    for (const [name, ms] of Object.entries(result.switch_ms)) {
      assert.ok(ms > 0 && ms < SWITCH_LIMIT_MS, `${name}: switched within ${SWITCH_LIMIT_MS} ms (${ms} ms)`);
    }
    assert.equal(result.callbacks, 3, 'three logins came back through /redirect');
    for (const request of result.external_requests) {
      assert.equal(new URL(request.from).origin, opOrigin, `only the provider's pages ask for ${request.url}`);
    }
    assert.deepEqual(problems, [], 'no JavaScript errors on the demo pages');
    checkServerLog();
    await b.close();
    await a.close();
  } finally {
    await browser.close();
  }
  finish();
}

main().catch(fail);
