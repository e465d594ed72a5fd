/*
 * The twistauth demo page.
 *
 * Sign in with a local account (or an identity provider's button), see the
 * session, call a JSON method, and switch to "you were signed out" without
 * a reload the moment the session ends anywhere: the page keeps a
 * GET /logout/wait long-poll open while signed in, and polls again whenever
 * it answers {"logged_out": false}.
 *
 * Plain JavaScript: no build step, no dependencies.  Every value from the
 * server is shown with textContent, never parsed as HTML.
 */
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);

  const state = {
    config: null, // config.json
    user: null, // the last session.info answer while signed in
    lastUserId: '',
    methodsLoaded: false,
    watchGeneration: 0, // bumped to stop the running long-poll loop
    watchAbort: null, // AbortController of the pending long-poll
    polls: 0,
    signedOutAt: null, // performance.timeOrigin + now() when the page switched
    signedOutReason: null,
  };
  // Read by the browser tests (and handy in the developer tools).
  window.twistauthDemo = state;

  const REASONS = {
    logout: 'This session was signed out in another tab or window.',
    logout_everywhere: 'You signed out everywhere, from another tab, window or device.',
    backchannel: 'Your identity provider ended your session.',
    session_ended: 'Your session is over: it expired, or it was signed out while this page was away.',
    password_changed: 'Your password was changed, which ended every session.',
  };

  const EXAMPLE_PARAMETERS = {
    echo: '{"hello": "world"}',
  };

  // -- the JSON-method protocol -------------------------------------------

  class ApiError extends Error {
    constructor(error, status, retryAfter) {
      const value = error && error.value;
      const message = typeof value === 'string' ? value : (value && value.message) || 'error';
      super(message);
      this.name = (error && error.name) || 'error';
      this.code = (error && error.code) || 0;
      this.value = value;
      this.status = status || 0;
      this.retryAfter = retryAfter ? Number(retryAfter) : 0;
    }
  }

  function readCookie(name) {
    for (const part of document.cookie.split(';')) {
      const eq = part.indexOf('=');
      if (eq > 0 && part.slice(0, eq).trim() === name) {
        return decodeURIComponent(part.slice(eq + 1).trim());
      }
    }
    return '';
  }

  /* POST one call; answer {status, body, retryAfter} (body may be null). */
  async function post(method, parameters) {
    const config = state.config;
    const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
    const csrf = readCookie(config.csrf_cookie);
    if (csrf) {
      headers[config.csrf_header] = csrf; // double submit: proves the call is from this origin
    }
    const response = await fetch(config.api_path, {
      method: 'POST',
      credentials: 'same-origin',
      cache: 'no-store',
      headers: headers,
      body: JSON.stringify({ method: method, parameters: parameters || {} }),
    });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    return { status: response.status, body: body, retryAfter: response.headers.get('Retry-After') };
  }

  /* Call a method: its result, or throw an ApiError. */
  async function call(method, parameters) {
    let answer;
    try {
      answer = await post(method, parameters);
    } catch (e) {
      throw new ApiError({ name: 'unreachable', value: 'the server cannot be reached' }, 0);
    }
    const body = answer.body;
    if (!body || typeof body !== 'object') {
      throw new ApiError({ name: 'bad_answer', value: 'HTTP ' + answer.status }, answer.status);
    }
    if (body.error) {
      throw new ApiError(body.error, answer.status, answer.retryAfter);
    }
    return body.result;
  }

  function describeError(error) {
    switch (error.name) {
      case 'invalid_credentials':
        return 'Wrong user id or password.';
      case 'login_throttled':
        return 'Too many failed attempts. Try again' +
          (error.retryAfter ? ' in ' + error.retryAfter + ' seconds.' : ' later.');
      case 'user_exists':
        return 'That user id is taken: sign in instead, or choose another.';
      case 'account_disabled':
        return 'This account is disabled.';
      case 'unreachable':
        return 'The server cannot be reached.';
      default: {
        const text = error.message.charAt(0).toUpperCase() + error.message.slice(1);
        return /[.!?]$/.test(text) ? text : text + '.';
      }
    }
  }

  function showError(element, error) {
    element.textContent = '';
    const text = document.createElement('span');
    text.textContent = describeError(error);
    element.appendChild(text);
    if (error.code) {
      const code = document.createElement('span');
      code.className = 'code';
      code.textContent = error.name + ' \u00b7 ' + error.code;
      element.appendChild(code);
    }
    element.hidden = false;
  }

  // -- views ----------------------------------------------------------------

  function showView(name) {
    for (const view of document.querySelectorAll('.view')) {
      view.hidden = view.id !== 'view-' + name;
    }
    document.body.dataset.view = name;
  }

  function showLogin(notice) {
    stopWatch();
    state.user = null;
    $('login-error').hidden = true;
    const box = $('notice');
    box.textContent = notice || '';
    box.hidden = !notice;
    $('user-id').value = state.lastUserId || $('user-id').value;
    showView('login');
    (state.lastUserId ? $('password') : $('user-id')).focus();
  }

  function formatTime(seconds) {
    if (typeof seconds !== 'number') {
      return '\u2014';
    }
    return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'long' });
  }

  function signedIn(info) {
    state.user = info;
    state.lastUserId = info.user_id;
    $('who').textContent = info.user_id;
    const roles = $('roles');
    roles.textContent = '';
    if (info.roles && info.roles.length) {
      for (const role of info.roles) {
        const chip = document.createElement('span');
        chip.className = 'chip';
        chip.textContent = role;
        roles.appendChild(chip);
      }
    } else {
      roles.textContent = 'none';
      roles.classList.add('muted');
    }
    $('since').textContent = formatTime(info.authenticated_at);
    $('permanent').textContent = info.permanent
      ? 'yes: the cookie outlives the browser'
      : 'no: the cookie ends with the browser';
    const sessionCookie = state.config.csrf_cookie.replace(/_csrf$/, '');
    $('cookie-info').textContent = readCookie(sessionCookie)
      ? sessionCookie + ' is readable by script (it should be HttpOnly)'
      : 'HttpOnly: this page cannot read it';
    $('session-error').hidden = true;
    state.polls = 0;
    showView('session');
    loadMethods();
    startWatch();
  }

  function signedOut(reason) {
    stopWatch();
    state.user = null;
    state.signedOutAt = performance.timeOrigin + performance.now();
    state.signedOutReason = reason;
    $('signed-out-why').textContent =
      REASONS[reason] || 'The session ended (' + reason + ').';
    $('signed-out-reason').textContent = reason;
    $('signed-out-when').textContent = new Date().toLocaleTimeString(undefined, { timeStyle: 'medium' });
    showView('signed-out');
  }

  // -- the logout long-poll --------------------------------------------------

  function setWatch(text, live) {
    $('watch-info').textContent = text;
    const badge = $('watch-badge');
    badge.hidden = false;
    badge.classList.toggle('live', live);
    $('watch-badge-text').textContent = live ? 'live logout watch' : 'reconnecting';
  }

  function stopWatch() {
    state.watchGeneration += 1;
    if (state.watchAbort) {
      state.watchAbort.abort();
      state.watchAbort = null;
    }
    $('watch-badge').hidden = true;
  }

  function startWatch() {
    stopWatch();
    watchLoop(state.watchGeneration);
  }

  function pause(generation, failures, why, seconds) {
    const delay = seconds > 0 ? seconds * 1000 : Math.min(30000, 1000 * 2 ** Math.min(failures - 1, 5));
    if (generation === state.watchGeneration) {
      setWatch('reconnecting in ' + Math.round(delay / 1000) + ' s (' + why + ')', false);
    }
    return new Promise((resolve) => setTimeout(resolve, delay));
  }

  async function watchLoop(generation) {
    const config = state.config;
    const url = config.logout_wait_path + '?timeout=' + encodeURIComponent(config.wait_timeout);
    let failures = 0;
    while (generation === state.watchGeneration) {
      const abort = new AbortController();
      state.watchAbort = abort;
      state.polls += 1;
      setWatch('open: GET ' + config.logout_wait_path + ' is waiting (poll ' + state.polls + ')', true);
      let response;
      let body = null;
      try {
        response = await fetch(url, {
          credentials: 'same-origin',
          cache: 'no-store',
          headers: { Accept: 'application/json' },
          signal: abort.signal,
        });
        body = await response.json().catch(() => null);
      } catch (e) {
        if (generation !== state.watchGeneration) {
          return; // stopped on purpose
        }
        failures += 1;
        await pause(generation, failures, 'the server cannot be reached', 0);
        continue;
      }
      if (generation !== state.watchGeneration) {
        return;
      }
      if (response.ok && body && body.logged_out === true) {
        signedOut(body.reason || 'logged_out');
        return;
      }
      if (response.ok && body && body.logged_out === false) {
        failures = 0;
        if (body.reason === 'shutdown') {
          await pause(generation, 1, 'the server is restarting', 2);
        }
        continue; // the wait timed out: still signed in, wait again
      }
      if (response.status === 401) {
        signedOut('session_ended'); // the session no longer resolves
        return;
      }
      failures += 1;
      await pause(generation, failures, 'HTTP ' + response.status, Number(response.headers.get('Retry-After')) || 0);
    }
  }

  // -- actions ------------------------------------------------------------

  function busy(buttons, on) {
    for (const id of buttons) {
      $(id).disabled = on;
    }
  }

  async function logIn(create) {
    const errorBox = $('login-error');
    errorBox.hidden = true;
    $('notice').hidden = true;
    const userId = $('user-id').value.trim();
    const password = $('password').value;
    if (!userId || !password) {
      showError(errorBox, new ApiError({ value: 'enter a user id and a password' }));
      return;
    }
    busy(['login-button', 'create-button'], true);
    try {
      const info = create
        ? await call('account.create', { user_id: userId, password: password })
        : await call('account.login', { user_id: userId, password: password, remember: $('remember').checked });
      $('password').value = '';
      signedIn(info);
    } catch (error) {
      showError(errorBox, error);
      $('password').select();
    } finally {
      busy(['login-button', 'create-button'], false);
    }
  }

  async function signOut(everywhere) {
    busy(['logout-button', 'everywhere-button'], true);
    stopWatch(); // our own logout is not news
    try {
      const result = await call(everywhere ? 'account.logout_everywhere' : 'account.logout');
      if (everywhere) {
        const ended = result && result.ended;
        showLogin(ended > 0
          ? 'Signed out of ' + ended + (ended === 1 ? ' session.' : ' sessions.')
          : 'Signed out everywhere.');
      } else {
        showLogin('You signed out.');
      }
    } catch (error) {
      if (error.status === 401) {
        showLogin('Your session had already ended.');
      } else {
        showError($('session-error'), error);
        startWatch(); // still signed in
      }
    } finally {
      busy(['logout-button', 'everywhere-button'], false);
    }
  }

  async function loadMethods() {
    if (state.methodsLoaded) {
      return;
    }
    state.methodsLoaded = true;
    let names = [];
    try {
      const response = await fetch(state.config.api_path, {
        credentials: 'same-origin',
        cache: 'no-store',
        headers: { Accept: 'application/json' },
      });
      const body = await response.json();
      names = (body.result || []).map((m) => m.name);
    } catch (e) {
      names = [];
    }
    // account.* have their own buttons; enable_signing would make every
    // later call of this page need a signature it does not make.
    names = names.filter((n) => !n.startsWith('account.') && n !== 'session.enable_signing');
    if (!names.length) {
      names = ['time.now', 'echo', 'session.info'];
    }
    const select = $('method');
    select.textContent = '';
    for (const name of names) {
      const option = document.createElement('option');
      option.value = name;
      option.textContent = name;
      select.appendChild(option);
    }
    select.value = names.includes('time.now') ? 'time.now' : names[0];
    $('params').value = EXAMPLE_PARAMETERS[select.value] || '{}';
  }

  async function callMethod() {
    const method = $('method').value;
    const output = $('call-output');
    const status = $('call-status');
    let parameters;
    try {
      parameters = JSON.parse($('params').value || '{}');
      if (!parameters || typeof parameters !== 'object' || Array.isArray(parameters)) {
        throw new Error('not an object');
      }
    } catch (e) {
      output.hidden = false;
      $('call-request').textContent = $('params').value;
      status.textContent = 'not sent';
      status.className = 'status bad';
      $('call-result').textContent = 'The parameters must be a JSON object, such as {"x": 1}.';
      return;
    }
    $('call-request').textContent =
      'POST ' + state.config.api_path + '\n' + JSON.stringify({ method: method, parameters: parameters }, null, 2);
    $('call-result').textContent = '\u2026';
    status.textContent = '';
    output.hidden = false;
    busy(['call-button'], true);
    const started = performance.now();
    try {
      const answer = await post(method, parameters);
      const ms = Math.max(1, Math.round(performance.now() - started));
      status.textContent = 'HTTP ' + answer.status + ' \u00b7 ' + ms + ' ms';
      status.className = 'status ' + (answer.status === 200 ? 'good' : 'bad');
      $('call-result').textContent = JSON.stringify(answer.body, null, 2);
    } catch (e) {
      status.textContent = 'failed';
      status.className = 'status bad';
      $('call-result').textContent = 'The server cannot be reached.';
    } finally {
      busy(['call-button'], false);
    }
  }

  function renderProviders() {
    const config = state.config;
    const list = $('provider-list');
    list.textContent = '';
    const providers = Array.isArray(config.providers) ? config.providers : [];
    for (const provider of providers) {
      const url = String(provider.login_url || '');
      if (!url.startsWith('/') || url.startsWith('//')) {
        continue; // only this server starts a login
      }
      const link = document.createElement('a');
      link.className = 'button provider';
      link.href = url;
      link.dataset.provider = String(provider.name || '');
      link.textContent = String(provider.label || provider.name || 'Identity provider');
      list.appendChild(link);
    }
    const any = list.children.length > 0;
    $('providers').hidden = !any;
    $('providers-or').hidden = !(any && config.local_accounts);
    $('login-form').hidden = !config.local_accounts;
    $('no-local').hidden = config.local_accounts || any;
    $('create-button').hidden = !config.account_signup;
  }

  // -- start ----------------------------------------------------------------

  async function start() {
    try {
      const response = await fetch('config.json', { cache: 'no-store' });
      state.config = await response.json();
    } catch (e) {
      $('view-loading').textContent = 'The demo cannot load its configuration (config.json).';
      return;
    }
    renderProviders();
    $('login-form').addEventListener('submit', (event) => {
      event.preventDefault();
      logIn(false);
    });
    $('create-button').addEventListener('click', () => logIn(true));
    $('logout-button').addEventListener('click', () => signOut(false));
    $('everywhere-button').addEventListener('click', () => signOut(true));
    $('again-button').addEventListener('click', () => showLogin(''));
    $('call-form').addEventListener('submit', (event) => {
      event.preventDefault();
      callMethod();
    });
    $('method').addEventListener('change', () => {
      $('params').value = EXAMPLE_PARAMETERS[$('method').value] || '{}';
    });
    try {
      const info = await call('session.info');
      if (info && info.user_id) {
        signedIn(info);
        return;
      }
    } catch (error) {
      showLogin('');
      showError($('login-error'), error);
      return;
    }
    showLogin('');
  }

  start();
})();
