'use strict';
// paystile console: one plain script, no framework, no build step. Everything it shows goes
// through textContent / setAttribute, never parsed as markup: ids and tags are client-chosen.
// The key lives in sessionStorage only and leaves the page only as the Authorization header.

(() => {
  const KEY_STORAGE = 'paystile.console.key';
  // How often the page reads again: the buyer's view and the seller's hour every 2 s, the
  // seller's day and month (whose buckets move slowly) every 5 s.
  const POLL_MS = 2000;
  const PAGE_LIMIT = 1000; // the API's largest page (CSV exports)
  const SHOWN_ROWS = 50; // one newest-first page of a listing
  const MAX_CSV_PAGES = 500;
  // The list of services changes rarely: read again after this long, or at login and on a
  // window change.
  const SERVICES_MAX_AGE_MS = 60e3;
  const WINDOWS = {
    hour: { ms: 3600e3, label: 'last hour', unit: 'minute', pollMs: POLL_MS },
    day: { ms: 24 * 3600e3, label: 'last day', unit: 'hour', pollMs: 5000 },
    month: { ms: 30 * 24 * 3600e3, label: 'last 30 days', unit: 'day', pollMs: 5000 },
  };
  const BUYER_CHARGES_MS = 30 * 24 * 3600e3;
  // What the charge listings show until another status is chosen: the calls that were paid
  // for. A gateway that prefetches holds leaves many released, zero-amount holds besides.
  const DEFAULT_STATUS = 'committed';
  // Shown for a value that is not there; drawn in the text font (see `.blank` in the style)
  // so that it looks the same in monospaced and proportional places.
  const BLANK = '\u2014';
  // The smallest width of a spend bar's fill once something is spent, so it stays visible.
  const MIN_SPEND_SHARE = 0.02;
  // The SVG namespace's name (an identifier, nothing is fetched from it), spelt in two parts
  // so that the page's files hold no URL of another site.
  const SVG_NS = ['http:', '', 'www.w3.org', '2000', 'svg'].join('/');

  // ---------------------------------------------------------------- state

  const state = {
    key: null,
    role: null, // 'admin' | 'buyer'
    whoami: null,
    session: 0, // bumped at login/logout: answers of an older session are dropped
    polling: false,
    pollAgain: false,
    pollTimer: null,
    window: 'hour',
    journal: { buyerId: '', tokenId: '', status: DEFAULT_STATUS }, // the applied filters
    buyerStatus: DEFAULT_STATUS, // the buyer's charges' status filter
    buyerId: null, // the buyer the seller looked up
    serviceList: null, // { ids, at }: the last GET /v1/services (see serviceIds)
    windowFrom: null, // { window, from }: the start of the window the series last gave
    services: new Map(), // service id -> its section's parts
  };

  // ---------------------------------------------------------------- small helpers

  const $ = (id) => document.getElementById(id);

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    applyAttrs(node, attrs);
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  function s(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    applyAttrs(node, attrs);
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  /**
   * Attributes are set by name from this script only; an event handler attribute would be
   * code (a Trusted Types sink under the page's policy), so none is ever set.
   */
  function checkAttrName(name) {
    if (/^on/i.test(name)) throw new Error(`refused to set the attribute ${name}`);
  }

  function applyAttrs(node, attrs) {
    if (!attrs) return;
    for (const [name, value] of Object.entries(attrs)) {
      if (value == null || value === false) continue;
      checkAttrName(name);
      if (name === 'text') node.textContent = String(value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
  }

  function setText(node, text) {
    const value = text == null ? '' : String(text);
    if (node.textContent !== value) node.textContent = value;
    const blank = value === BLANK;
    if (node.classList.contains('blank') !== blank) node.classList.toggle('blank', blank);
  }

  function setAttr(node, name, value) {
    checkAttrName(name);
    if (value == null || value === false) {
      if (node.hasAttribute(name)) node.removeAttribute(name);
    } else {
      const v = value === true ? '' : String(value);
      if (node.getAttribute(name) !== v) node.setAttribute(name, v);
    }
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function usdc(amount) {
    return amount == null ? BLANK : `${amount} USDC`;
  }

  /** A ratio of two money strings, for widths and heights only (never shown as money). */
  function ratio(part, whole) {
    const p = Number.parseFloat(part);
    const w = Number.parseFloat(whole);
    if (!Number.isFinite(p) || !Number.isFinite(w) || w <= 0) return p > 0 ? 1 : 0;
    return Math.min(1, Math.max(0, p / w));
  }

  function localTime(iso) {
    if (!iso) return BLANK;
    const at = new Date(iso);
    if (Number.isNaN(at.getTime())) return String(iso);
    return at.toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' });
  }

  function percent(fraction) {
    if (!Number.isFinite(fraction)) return BLANK;
    return `${(fraction * 100).toFixed(1)}%`;
  }

  // Money as exact integers of micro-USDC (6 decimals): sums never go through floats.
  const MICRO = 1000000n;

  /** "1.234567" -> 1234567n; null for anything that is not a plain decimal amount. */
  function toMicro(amount) {
    const m = /^\s*(-?)(\d*)(?:\.(\d*))?\s*$/.exec(amount == null ? '' : String(amount));
    if (!m || (!m[2] && !m[3])) return null;
    const whole = BigInt(m[2] || '0');
    // More than 6 decimals never comes from the API; cut them rather than round.
    const frac = BigInt(((m[3] || '') + '000000').slice(0, 6));
    const micro = whole * MICRO + frac;
    return m[1] ? -micro : micro;
  }

  /** 1234567n -> "1.234567". */
  function fromMicro(micro) {
    const negative = micro < 0n;
    const abs = negative ? -micro : micro;
    return `${negative ? '-' : ''}${abs / MICRO}.${String(abs % MICRO).padStart(6, '0')}`;
  }

  /** The exact sum of money strings, formatted with 6 decimals (missing ones count 0). */
  function sumUsdc(amounts) {
    let total = 0n;
    for (const amount of amounts) total += toMicro(amount) ?? 0n;
    return fromMicro(total);
  }

  function seg(id) {
    return encodeURIComponent(id);
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) {
      if (value != null && value !== '') q.set(name, String(value));
    }
    const text = q.toString();
    return text ? `?${text}` : '';
  }

  function tokenState(token) {
    if (token.revoked) return 'revoked';
    const expires = Date.parse(token.expiresAt);
    if (Number.isFinite(expires) && expires <= Date.now()) return 'expired';
    return 'active';
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function request(method, path, { body, accept = 'application/json', key = state.key } = {}) {
    const headers = { Accept: accept };
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, 'The ledger cannot be reached', 'network');
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`.trim();
      let code;
      try {
        const error = await response.json();
        if (error && typeof error.error === 'string') message = error.error;
        if (error && typeof error.code === 'string') code = error.code;
      } catch (_) {
        /* not JSON: keep the status line */
      }
      throw new ApiError(response.status, message, code);
    }
    return response;
  }

  async function api(method, path, options) {
    const response = await request(method, path, options);
    if (response.status === 204) return null;
    return response.json();
  }

  // ---------------------------------------------------------------- messages

  function notice(text) {
    setText($('notice'), text);
    setText($('error'), '');
  }

  function failure(text) {
    setText($('error'), text);
    setText($('notice'), '');
  }

  function clearMessages() {
    setText($('notice'), '');
    setText($('error'), '');
  }

  // ---------------------------------------------------------------- confirmation

  let pendingConfirm = null;

  /** Opens dialog#confirm; resolves true only when #confirm-yes is pressed. */
  function confirmAction(message, { yes = 'Confirm', danger = false } = {}) {
    const dialog = $('confirm');
    if (pendingConfirm) pendingConfirm(false);
    setText($('confirm-message'), message);
    const yesButton = $('confirm-yes');
    setText(yesButton, yes);
    yesButton.className = danger ? 'btn btn-danger' : 'btn btn-primary';
    dialog.returnValue = '';
    return new Promise((resolve) => {
      pendingConfirm = (answer) => {
        pendingConfirm = null;
        resolve(answer);
      };
      if (!dialog.open) dialog.showModal();
      $('confirm-no').focus();
    });
  }

  function wireConfirm() {
    const dialog = $('confirm');
    $('confirm-yes').addEventListener('click', () => dialog.close('yes'));
    $('confirm-no').addEventListener('click', () => dialog.close('no'));
    dialog.addEventListener('close', () => {
      if (pendingConfirm) pendingConfirm(dialog.returnValue === 'yes');
    });
  }

  /**
   * An action that changes money or access: confirm, send, report, refresh.
   * `send` returns the success message. The API's message on failure goes to `onError` when
   * given (a form that shows its own errors: then not to the top banner too), else to #error.
   */
  async function act(message, options, send, onError) {
    const ok = await confirmAction(message, options);
    if (!ok) return false;
    forgetSecrets();
    const session = state.session;
    try {
      const result = await send();
      if (session !== state.session) return false;
      notice(result);
      refreshNow();
      return true;
    } catch (err) {
      if (session !== state.session) return false;
      if (onError) {
        clearMessages();
        onError(err.message);
      } else {
        failure(err.message);
      }
      if (err.status === 401) expireSession();
      else refreshNow();
      return false;
    }
  }

  /** The one-time secrets (a new JWT, a new buyer key) go away at the next action. */
  function forgetSecrets() {
    const jwt = $('new-token-jwt');
    jwt.value = '';
    jwt.textContent = '';
    setText($('new-token-id'), '');
    show($('new-token'), false);
    setText($('new-buyer-key-value'), '');
    setText($('new-buyer-key-id'), '');
    show($('new-buyer-key'), false);
  }

  // ---------------------------------------------------------------- tables

  // A cell spec: { kind, cls?, ... }. Rows are kept per key and updated in place, so a
  // poll never replaces a button under the pointer.

  const cells = {
    text: (text, extra = {}) => ({ kind: 'text', text, ...extra }),
    id: (id, extra = {}) => ({ kind: 'id', text: id, ...extra }),
    time: (iso, extra = {}) => ({ kind: 'time', iso, ...extra }),
    money: (amount, extra = {}) => ({ kind: 'text', text: amount ?? BLANK, cls: `num mono ${extra.cls || ''}`.trim(), title: extra.title }),
    spend: (token) => ({ kind: 'spend', token }),
    status: (charge) => ({ kind: 'status', charge }),
    buttons: (list) => ({ kind: `buttons:${list.map((b) => b.cls).join(',')}`, list }),
  };

  function fillCell(td, spec) {
    if (td.dataset.kind !== spec.kind) {
      td.replaceChildren();
      td.dataset.kind = spec.kind;
      buildCell(td, spec);
    }
    // A missing value's dash gets `.blank` here too, so a poll leaves the class alone.
    const blank = spec.kind === 'text' && (spec.text ?? BLANK) === BLANK;
    setAttr(td, 'class', [spec.cls, blank ? 'blank' : null].filter(Boolean).join(' ') || null);
    updateCell(td, spec);
  }

  function buildCell(td, spec) {
    switch (spec.kind) {
      case 'id':
        td.append(h('span', { class: 'id-cell mono' }));
        break;
      case 'time':
        td.append(h('time'));
        break;
      case 'status':
        td.append(h('span', { class: 'status' }), h('span', { class: 'upstream mono' }));
        break;
      case 'spend':
        td.append(
          h('span', { class: 'token-used mono' }),
          h('div', { class: 'spend-bar', role: 'img' },
            h('div', { class: 'spend-reserved' }),
            h('div', { class: 'spend-fill' })),
        );
        break;
      default:
        if (spec.kind.startsWith('buttons:')) {
          for (const b of spec.list) td.append(h('button', { type: 'button', class: `btn btn-small ${b.cls}` }));
        }
    }
  }

  function updateCell(td, spec) {
    switch (spec.kind) {
      case 'text':
        setText(td, spec.text ?? BLANK);
        setAttr(td, 'title', spec.title ?? null);
        break;
      case 'id': {
        const span = td.firstChild;
        setText(span, spec.text ?? BLANK);
        setAttr(span, 'title', spec.text ?? null);
        break;
      }
      case 'time': {
        const time = td.firstChild;
        setText(time, localTime(spec.iso));
        setAttr(time, 'datetime', spec.iso || null);
        setAttr(time, 'title', spec.iso || null);
        break;
      }
      case 'status': {
        const c = spec.charge;
        const [status, upstream] = td.children;
        setText(status, c.sandbox ? `${c.status} (sandbox)` : c.status);
        setAttr(status, 'class', `status status-${c.status}`);
        const answered = c.upstreamStatus != null;
        setText(upstream, answered ? String(c.upstreamStatus) : '');
        setAttr(td, 'title', answered ? `${c.status}, upstream answered ${c.upstreamStatus}` : `${c.status}, no upstream answer`);
        break;
      }
      case 'spend': {
        const t = spec.token;
        const [used, bar] = td.children;
        const [reserved, fill] = bar.children;
        setText(used, `${t.usedUsdc} / ${t.limitUsdc}`);
        // The exact amount is in data-used-usdc and the label; the bar only has to show that
        // something was spent (or held), so a tiny share gets a small but visible width.
        const usedShare = ratio(t.usedUsdc, t.limitUsdc);
        const reservedShare = ratio(t.reservedUsdc || '0', t.limitUsdc);
        const fillShare = usedShare > 0 ? Math.max(usedShare, MIN_SPEND_SHARE) : 0;
        const heldShare = reservedShare > 0
          ? Math.min(1, Math.max(usedShare + reservedShare, fillShare + MIN_SPEND_SHARE))
          : fillShare;
        fill.style.width = `${(Math.min(1, fillShare) * 100).toFixed(2)}%`;
        reserved.style.width = `${(heldShare * 100).toFixed(2)}%`;
        setAttr(fill, 'data-used-usdc', t.usedUsdc);
        const left = t.remainingUsdc != null ? `, ${t.remainingUsdc} left` : '';
        const label = `${t.usedUsdc} of ${t.limitUsdc} USDC used, ${t.reservedUsdc || '0.000000'} held by calls in flight${left}`;
        setAttr(bar, 'aria-label', label);
        setAttr(bar, 'title', label);
        break;
      }
      default:
        if (spec.kind.startsWith('buttons:')) {
          spec.list.forEach((b, i) => {
            const button = td.children[i];
            setText(button, b.label);
            button.disabled = Boolean(b.disabled);
            setAttr(button, 'title', b.title ?? null);
            setAttr(button, 'aria-label', b.aria ?? null);
          });
        }
    }
  }

  /**
   * Brings tbody's rows to `items`, one `tr[keyAttr]` each, in order. `describe(item)` gives
   * `{ cells: [spec...], cls? }`.
   */
  function syncRows(table, keyAttr, items, keyOf, describe, emptyText) {
    const tbody = table.tBodies[0];
    const existing = new Map();
    for (const tr of Array.from(tbody.rows)) {
      const key = tr.getAttribute(keyAttr);
      if (key == null || existing.has(key)) tr.remove();
      else existing.set(key, tr);
    }
    const seen = new Set();
    let index = 0;
    for (const item of items) {
      const key = String(keyOf(item));
      if (seen.has(key)) continue;
      seen.add(key);
      let tr = existing.get(key);
      if (tr) existing.delete(key);
      else tr = h('tr', { [keyAttr]: key });
      const { cells: specs, cls } = describe(item);
      specs.forEach((spec, i) => fillCell(tr.cells[i] || tr.appendChild(h('td')), spec));
      while (tr.cells.length > specs.length) tr.lastChild.remove();
      setAttr(tr, 'class', cls || null);
      if (tbody.rows[index] !== tr) tbody.insertBefore(tr, tbody.rows[index] || null);
      index += 1;
    }
    for (const tr of existing.values()) tr.remove();
    if (index === 0) {
      const columns = table.tHead ? Array.from(table.tHead.rows[0].cells).filter((th) => !th.hidden).length : 1;
      tbody.append(h('tr', { class: 'empty-row' }, h('td', { colspan: columns, text: emptyText })));
    }
  }

  function clearTable(table) {
    table.tBodies[0].replaceChildren();
  }

  // ---------------------------------------------------------------- charges, newest first

  /**
   * The newest `SHOWN_ROWS` charges of a listing since `from`: one newest-first page
   * (`order=desc`; its `nextCursor` would go on to older ones, which are not shown).
   */
  async function newestCharges(path, params, from) {
    const page = await api('GET', path + query({ ...params, from, order: 'desc', limit: SHOWN_ROWS }));
    return { rows: (page.charges || []).slice(0, SHOWN_ROWS), more: Boolean(page.nextCursor) };
  }

  /** A charge's row; the status cell also holds the upstream's HTTP status when it answered. */
  function chargeRow(c, { withBuyer = false, withSettlement = false } = {}) {
    const list = [
      cells.time(c.createdAt),
      cells.id(c.chargeId),
      cells.id(c.tokenId),
    ];
    if (withBuyer) list.push(cells.id(c.buyerId));
    list.push(
      cells.text(c.serviceId, { cls: 'mono' }),
      cells.money(c.amountUsdc),
      cells.money(c.heldUsdc),
      cells.status(c),
    );
    if (withSettlement) {
      const st = c.settlement;
      list.push(cells.text(st ? st.status : BLANK, {
        title: st ? [st.transaction, st.reason].filter(Boolean).join('; ') || null : null,
      }));
    }
    return { cells: list, cls: c.sandbox ? 'sandbox' : null };
  }

  // ---------------------------------------------------------------- CSV

  /** Downloads every page of a CSV listing as charges.csv (fetch -> Blob -> object URL). */
  async function downloadCsv(path, params) {
    let cursor = null;
    const parts = [];
    for (let page = 0; page < MAX_CSV_PAGES; page += 1) {
      const response = await request('GET', path + query({ ...params, limit: PAGE_LIMIT, cursor }), { accept: 'text/csv' });
      let text = await response.text();
      if (page > 0) {
        // Every page starts with the header line: keep the first page's only.
        const end = text.indexOf('\n');
        text = end < 0 ? '' : text.slice(end + 1);
      }
      parts.push(text);
      cursor = response.headers.get('x-next-cursor');
      if (!cursor) break;
    }
    const blob = new Blob(parts, { type: 'text/csv;charset=utf-8' });
    const url = URL.createObjectURL(blob);
    const link = h('a', { href: url, download: 'charges.csv', class: 'sr-only' });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60e3);
  }

  async function csvButton(button, path, params) {
    button.disabled = true;
    try {
      await downloadCsv(path, params);
      notice('charges.csv downloaded');
    } catch (err) {
      failure(err.message);
      if (err.status === 401) expireSession();
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- login / logout

  async function login(key) {
    const whoami = await api('GET', '/v1/whoami', { key });
    state.session += 1;
    clearTimeout(state.pollTimer);
    state.pollTimer = null;
    state.polling = false;
    state.pollAgain = false;
    state.key = key;
    state.whoami = whoami;
    state.role = whoami.role === 'admin' ? 'admin' : 'buyer';
    state.serviceList = null;
    state.windowFrom = null;
    try {
      sessionStorage.setItem(KEY_STORAGE, key);
    } catch (_) {
      /* storage refused: the session lasts while the page is open */
    }
    enterApp();
  }

  function enterApp() {
    const seller = state.role === 'admin';
    setText($('role'), seller ? 'seller' : 'buyer');
    $('role').className = `badge badge-${seller ? 'seller' : 'buyer'}`;
    const buyerKey = state.whoami.key;
    setText($('whoami'), seller ? 'seller' : (buyerKey && buyerKey.buyerId) || 'buyer');
    setAttr($('whoami'), 'title', seller ? null : buyerKey ? `key ${buyerKey.keyId}${buyerKey.label ? ` (${buyerKey.label})` : ''}` : null);
    show($('session'), true);
    show($('login-view'), false);
    show($('seller-view'), seller);
    show($('buyer-view'), !seller);
    setText($('login-error'), '');
    $('login-key').value = '';
    if (!seller) setupTokenForm();
    else {
      updateWindowButtons();
      describeFilters();
    }
    refreshNow();
  }

  function logout(message) {
    state.session += 1;
    state.key = null;
    state.role = null;
    state.whoami = null;
    state.polling = false;
    state.pollAgain = false;
    clearTimeout(state.pollTimer);
    state.pollTimer = null;
    state.serviceList = null;
    state.windowFrom = null;
    state.buyerId = null;
    state.window = 'hour';
    state.journal = { buyerId: '', tokenId: '', status: DEFAULT_STATUS };
    state.buyerStatus = DEFAULT_STATUS;
    try {
      sessionStorage.removeItem(KEY_STORAGE);
    } catch (_) {
      /* nothing stored */
    }
    const dialog = $('confirm');
    if (dialog.open) dialog.close('no');
    forgetSecrets();
    clearMessages();
    clearViews();
    show($('session'), false);
    show($('seller-view'), false);
    show($('buyer-view'), false);
    show($('login-view'), true);
    setText($('login-error'), message || '');
    $('login-key').focus();
  }

  function expireSession() {
    logout('Wrong or revoked key');
  }

  /** Nothing of one session stays on the page for the next. */
  function clearViews() {
    for (const id of ['balance', 'spent-today', 'remaining-today', 'daily-limit', 'balance-total', 'balance-held', 'buyer-tier-own']) setText($(id), BLANK);
    for (const id of ['tokens', 'buyer-charges', 'top-tokens', 'top-buyers', 'holds', 'journal', 'buyer-tokens', 'buyer-keys']) clearTable($(id));
    for (const parts of state.services.values()) parts.section.remove();
    state.services.clear();
    show($('services-empty'), true);
    show($('buyer-detail'), false);
    for (const id of ['token-error', 'token-hint', 'journal-filters', 'holds-count', 'live', 'role', 'whoami', 'buyer-detail-status']) setText($(id), '');
    for (const form of ['token-form', 'journal-form', 'buyer-form', 'deposit-form', 'tier-form', 'key-form']) $(form).reset();
    $('buyer-charges-status').value = DEFAULT_STATUS;
    show($('journal-settlement'), false);
    setServiceControl([]);
  }

  // ---------------------------------------------------------------- polling

  function refreshNow() {
    clearTimeout(state.pollTimer);
    state.pollTimer = null;
    poll();
  }

  async function poll() {
    if (!state.key) return;
    if (state.polling) {
      state.pollAgain = true;
      return;
    }
    state.polling = true;
    const session = state.session;
    try {
      if (state.role === 'admin') await pollSeller(session);
      else await pollBuyer(session);
      if (session === state.session) {
        setText($('live'), `Updated ${new Date().toLocaleTimeString()}`);
        $('live').className = 'live';
      }
    } catch (err) {
      if (session === state.session) {
        if (err.status === 401) {
          expireSession();
          return;
        }
        setText($('live'), `Not updated: ${err.message}`);
        $('live').className = 'live live-stale';
      }
    } finally {
      if (session === state.session) {
        state.polling = false;
        if (state.pollAgain) {
          state.pollAgain = false;
          poll();
        } else {
          state.pollTimer = setTimeout(poll, pollInterval());
        }
      }
    }
  }

  /** The pause between two polls: the seller's day and month move slower than the hour. */
  function pollInterval() {
    if (state.role === 'admin') return WINDOWS[state.window]?.pollMs ?? POLL_MS;
    return POLL_MS;
  }

  /** Runs the reads together; each renders itself; the first failure is thrown at the end. */
  async function settleAll(session, tasks) {
    const results = await Promise.allSettled(tasks);
    if (session !== state.session) return;
    const failed = results.find((r) => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  // ---------------------------------------------------------------- buyer view

  function setServiceControl(services) {
    const current = $('token-service');
    const wanted = services.length ? 'SELECT' : 'INPUT';
    let control = current;
    if (current.tagName !== wanted) {
      control = wanted === 'SELECT'
        ? h('select', { id: 'token-service', name: 'service', required: true })
        : h('input', { id: 'token-service', name: 'service', type: 'text', spellcheck: 'false', required: true, placeholder: 'service id' });
      current.replaceWith(control);
    }
    if (wanted === 'SELECT') {
      const chosen = control.value;
      control.replaceChildren(...services.map((id) => h('option', { value: id, text: id })));
      if (services.includes(chosen)) control.value = chosen;
    }
  }

  function setupTokenForm() {
    const whoami = state.whoami;
    const key = whoami.key || {};
    const sold = whoami.services || [];
    const allowed = key.services && key.services.length ? key.services : [];
    let services = sold;
    if (allowed.length) services = sold.length ? allowed.filter((id) => sold.includes(id)) : allowed;
    if (allowed.length && !services.length) services = allowed;
    setServiceControl(services);
    const hints = [];
    if (key.maxLimitUsdc) hints.push(`This key issues tokens with caps up to ${key.maxLimitUsdc} USDC.`);
    if (allowed.length) hints.push(`It may use: ${allowed.join(', ')}.`);
    setText($('token-hint'), hints.join(' '));
  }

  async function pollBuyer(session) {
    const from = new Date(Date.now() - BUYER_CHARGES_MS).toISOString();
    const status = state.buyerStatus;
    await settleAll(session, [
      api('GET', '/v1/me').then((me) => {
        if (session === state.session) renderMe(me);
      }),
      newestCharges('/v1/me/charges', buyerChargesParams(), from).then(({ rows }) => {
        if (session === state.session && status === state.buyerStatus) {
          const empty = status ? `No ${status} charges in the last 30 days.` : 'No charges in the last 30 days.';
          syncRows($('buyer-charges'), 'data-charge-id', rows, (c) => c.chargeId, (c) => chargeRow(c), empty);
        }
      }),
    ]);
  }

  function buyerChargesParams() {
    return { status: state.buyerStatus };
  }

  function chooseBuyerStatus() {
    state.buyerStatus = $('buyer-charges-status').value;
    clearTable($('buyer-charges'));
    refreshNow();
  }

  function renderAccount(account, ids) {
    if (!account) {
      setText($(ids.available), 'no prepaid account');
      for (const id of ids.rest) setText($(id), BLANK);
      return;
    }
    setText($(ids.available), usdc(account.availableUsdc));
  }

  function renderMe(me) {
    const a = me.account;
    renderAccount(a, { available: 'balance', rest: ['spent-today', 'remaining-today', 'daily-limit', 'balance-total', 'balance-held', 'buyer-tier-own'] });
    if (a) {
      setText($('spent-today'), usdc(a.spentTodayUsdc));
      setText($('remaining-today'), usdc(a.remainingTodayUsdc));
      setText($('daily-limit'), usdc(a.dailyLimitUsdc));
      setText($('balance-total'), usdc(a.balanceUsdc));
      setText($('balance-held'), usdc(a.heldUsdc));
      setText($('buyer-tier-own'), a.tier);
    }
    const tokens = (me.tokens || []).slice();
    syncRows($('tokens'), 'data-token-id', tokens, (t) => t.tokenId, (t) => tokenRow(t, 'kill', 'Kill', 'Kill switch: revoke this token'), 'No tokens yet.');
  }

  function tokenRow(t, buttonCls, label, aria) {
    const st = tokenState(t);
    const service = t.serviceId || (t.scope === 'ALL' ? 'any service' : BLANK);
    const tag = [t.buyerTag, t.sandbox ? 'sandbox' : null, t.parentId ? `child of ${t.parentId}` : null].filter(Boolean).join(' · ');
    return {
      cells: [
        cells.id(t.tokenId),
        cells.text(service, { cls: 'token-service mono' }),
        cells.text(tag || BLANK, { title: tag || null, cls: 'tag-cell' }),
        cells.spend(t),
        cells.text(st, { cls: `token-state state-${st}` }),
        cells.time(t.expiresAt),
        cells.buttons([{ cls: `btn-danger ${buttonCls}`, label, disabled: t.revoked, aria: `${aria} ${t.tokenId}`, title: t.revoked ? 'Already revoked' : aria }]),
      ],
      cls: `state-${st}`,
    };
  }

  async function issueToken(event) {
    event.preventDefault();
    forgetSecrets();
    setText($('token-error'), '');
    const serviceId = $('token-service').value.trim();
    const limitUsdc = $('token-cap').value.trim();
    const expiry = $('token-expiry').value;
    const buyerTag = $('token-tag').value.trim();
    const problem = !serviceId ? 'Choose a service.' : !limitUsdc ? 'Enter a cap in USDC.' : null;
    if (problem) {
      clearMessages();
      setText($('token-error'), problem);
      return;
    }
    const body = { serviceId, limitUsdc };
    if (buyerTag) body.buyerTag = buyerTag;
    let expiresText = 'no expiry of its own';
    if (expiry) {
      const at = new Date(expiry);
      if (Number.isNaN(at.getTime())) {
        clearMessages();
        setText($('token-error'), 'The expiry is not a valid time.');
        return;
      }
      body.expiresAt = at.toISOString();
      expiresText = `expiring ${at.toLocaleString()}`;
    }
    await act(
      `Issue a token for ${serviceId} with a cap of ${limitUsdc} USDC (${expiresText})? Calls with it can spend up to ${limitUsdc} USDC of your balance.`,
      { yes: 'Issue token' },
      async () => {
        const issued = await api('POST', '/v1/me/tokens', { body });
        const jwt = $('new-token-jwt');
        jwt.textContent = issued.jwt;
        jwt.value = issued.jwt;
        setText($('new-token-id'), issued.tokenId);
        setAttr($('new-token-id'), 'title', issued.tokenId);
        show($('new-token'), true);
        $('token-cap').value = '';
        $('token-tag').value = '';
        $('token-expiry').value = '';
        return `Token ${issued.tokenId} issued with a cap of ${issued.limitUsdc} USDC.`;
      },
      (message) => setText($('token-error'), message),
    );
  }

  function killToken(tokenId) {
    return act(
      `Revoke token ${tokenId}? Calls with it will be refused at once.`,
      { yes: 'Revoke token', danger: true },
      async () => {
        await api('POST', `/v1/me/tokens/${seg(tokenId)}/revoke`);
        return `Token ${tokenId} revoked.`;
      },
    );
  }

  function panic() {
    return act(
      'Revoke every one of your tokens? Calls with any of them will be refused at once.',
      { yes: 'Revoke all', danger: true },
      async () => {
        const answer = await api('POST', '/v1/me/revoke');
        return `Revoked ${answer.revokedTokens} token${answer.revokedTokens === 1 ? '' : 's'}.`;
      },
    );
  }

  // ---------------------------------------------------------------- seller view

  /**
   * The start of the window the figures cover: the series' own `from` (aligned to UTC by
   * the ledger) once a series of this window has been read, else the last `ms` until now.
   */
  function windowStart() {
    const known = state.windowFrom;
    if (known && known.window === state.window && known.from) return known.from;
    return new Date(Date.now() - WINDOWS[state.window].ms).toISOString();
  }

  function updateWindowButtons() {
    for (const name of Object.keys(WINDOWS)) {
      setAttr($(`window-${name}`), 'aria-pressed', String(name === state.window));
    }
    for (const node of document.querySelectorAll('.window-label')) setText(node, WINDOWS[state.window].label);
  }

  function chooseWindow(name) {
    if (state.window === name) return;
    state.window = name;
    state.windowFrom = null;
    state.serviceList = null; // read the services again with the new window
    updateWindowButtons();
    refreshNow();
  }

  /**
   * The services' ids: GET /v1/services at most once a minute (and at login or a window
   * change). Should a read fail, the last list stands in while there is one.
   */
  async function serviceIds() {
    const known = state.serviceList;
    if (known && Date.now() - known.at < SERVICES_MAX_AGE_MS) return known.ids;
    try {
      const answer = await api('GET', '/v1/services');
      const ids = answer.services || [];
      state.serviceList = { ids, at: Date.now() };
      return ids;
    } catch (err) {
      if (known && err.status !== 401) return known.ids;
      throw err;
    }
  }

  /**
   * One poll of the seller's page. The series go first: their `from` is the start of the
   * window that top spenders and the journal then cover too, so every figure on the page
   * counts the same calls. The live holds and an open buyer do not depend on it.
   */
  async function pollSeller(session) {
    const win = state.window;
    const sideTasks = [
      api('GET', `/v1/charges${query({ status: 'held', order: 'desc', limit: SHOWN_ROWS })}`).then((page) => {
        if (session === state.session) renderHolds(page);
      }),
    ];
    if (state.buyerId) sideTasks.push(pollBuyerDetail(session, state.buyerId));
    const windowTasks = (async () => {
      const from = await pollServices(session, win);
      if (session !== state.session || win !== state.window) return;
      await settleAll(session, [
        api('GET', `/v1/top-spenders${query({ from, limit: 10 })}`).then((top) => {
          if (session === state.session && win === state.window) renderTopSpenders(top);
        }),
        pollJournal(session, win, from),
      ]);
    })();
    await settleAll(session, [windowTasks, ...sideTasks]);
  }

  /**
   * Reads every service's series of the window and draws them: the window's `from` as the
   * series gave it (every service's is the same for one window), or the local window start
   * when there is no series to ask. A failed series is thrown after the others are drawn.
   */
  async function pollServices(session, win) {
    const ids = await serviceIds();
    const results = await Promise.allSettled(ids.map((id) => api('GET', `/v1/services/${seg(id)}/series${query({ window: win })}`)));
    if (session !== state.session || win !== state.window) return windowStart();
    const wanted = new Set(ids);
    for (const [id, parts] of state.services) {
      if (!wanted.has(id)) {
        parts.section.remove();
        state.services.delete(id);
      }
    }
    let failed = null;
    let from = null;
    results.forEach((r, i) => {
      if (r.status === 'fulfilled') {
        from = from || r.value.from || null;
        renderService(ids[i], r.value, i);
      } else {
        failed = failed || r.reason;
      }
    });
    show($('services-empty'), ids.length === 0);
    if (from) state.windowFrom = { window: win, from };
    if (failed) throw failed;
    return windowStart();
  }

  function serviceSection(id, index) {
    let parts = state.services.get(id);
    if (!parts) {
      const stat = (cls, label) => {
        const value = h('dd', { class: `${cls} mono` });
        return { node: h('div', { class: 'stat' }, h('dt', { text: label }), value), value };
      };
      const calls = stat('calls', 'Calls');
      const revenue = stat('revenue', 'Revenue');
      const errorRate = stat('error-rate', 'Upstream errors');
      const refusals = h('ul', { class: 'refusals' });
      const chart = s('svg', { class: 'chart', role: 'img', focusable: 'false' });
      const legend = h('ul', { class: 'legend' },
        h('li', null, h('span', { class: 'swatch swatch-committed', 'aria-hidden': 'true' }), 'calls charged'),
        h('li', null, h('span', { class: 'swatch swatch-uncommitted', 'aria-hidden': 'true' }), 'answered, not charged'),
        h('li', null, h('span', { class: 'swatch swatch-refusals', 'aria-hidden': 'true' }), 'refusals'),
        h('li', null, h('span', { class: 'swatch swatch-revenue', 'aria-hidden': 'true' }), 'revenue (right axis)'),
        h('li', null, h('span', { class: 'swatch swatch-errors', 'aria-hidden': 'true' }), 'upstream error rate (strip)'),
      );
      const section = h('section', { class: 'service card', 'data-service-id': id },
        h('h3', { class: 'mono', text: id, title: id }),
        h('dl', { class: 'stats' }, calls.node, revenue.node, errorRate.node,
          h('div', { class: 'stat stat-refusals' }, h('dt', { text: 'Refusals' }), h('dd', null, refusals))),
        h('div', { class: 'chart-wrap' }, chart),
        legend,
      );
      parts = { section, calls: calls.value, revenue: revenue.value, errorRate: errorRate.value, refusals, chart };
      state.services.set(id, parts);
    }
    const container = $('services');
    const services = Array.from(container.querySelectorAll(':scope > section.service'));
    if (services[index] !== parts.section) container.insertBefore(parts.section, services[index] || null);
    return parts;
  }

  /**
   * A bucket's calls: those the upstream answered, or the committed charges when there are
   * more of them (a call charged before it is served, x402 `settle: before`, is committed
   * with no upstream status). Charges alone are not calls: a gateway that prefetches holds
   * takes some ahead and releases the unused ones (amount 0, no upstream status).
   * `charged` = committed, `uncharged` = the calls answered but not charged. The error rate
   * stays errors / upstream answers.
   */
  function bucketCalls(b) {
    const answered = Math.max(0, Number(b.upstreamAnswered) || 0);
    const committed = Math.max(0, Number(b.committed) || 0);
    const calls = Math.max(answered, committed);
    return { calls, answered, charged: committed, uncharged: calls - committed, errors: Math.max(0, Number(b.upstreamErrors) || 0) };
  }

  /** The window's figures from its buckets (what the chart shows): no separate summary. */
  function windowTotals(buckets) {
    const totals = { calls: 0, answered: 0, charged: 0, uncharged: 0, errors: 0, refusals: {} };
    for (const b of buckets) {
      const k = bucketCalls(b);
      totals.calls += k.calls;
      totals.answered += k.answered;
      totals.charged += k.charged;
      totals.uncharged += k.uncharged;
      totals.errors += k.errors;
      for (const [code, n] of Object.entries(b.refusals || {})) {
        const count = Number(n) || 0;
        if (count > 0) totals.refusals[code] = (totals.refusals[code] || 0) + count;
      }
    }
    totals.revenueUsdc = sumUsdc(buckets.map((b) => b.revenueUsdc));
    return totals;
  }

  function renderService(id, series, index) {
    const parts = serviceSection(id, index);
    const totals = windowTotals(series.buckets || []);
    setText(parts.calls, String(totals.calls));
    setAttr(parts.calls, 'title', `${totals.calls} call${totals.calls === 1 ? '' : 's'}: ${totals.charged} charged, ${totals.uncharged} answered but not charged`);
    setText(parts.revenue, usdc(totals.revenueUsdc));
    setText(parts.errorRate, totals.answered ? percent(totals.errors / totals.answered) : BLANK);
    setAttr(parts.errorRate, 'title', totals.answered ? `${totals.errors} error${totals.errors === 1 ? '' : 's'} of ${totals.answered} upstream answers` : 'no upstream answers in this window');
    const refusals = Object.entries(totals.refusals).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
    const items = refusals.length
      ? refusals.map(([code, n]) => h('li', null, h('span', { class: 'mono', text: code }), `: ${n}`))
      : [h('li', { class: 'muted', text: 'none' })];
    parts.refusals.replaceChildren(...items);
    drawChart(parts.chart, id, series);
  }

  function niceCeil(n) {
    if (n <= 1) return 1;
    const power = 10 ** Math.floor(Math.log10(n));
    for (const m of [1, 2, 5, 10]) if (m * power >= n) return m * power;
    return 10 * power;
  }

  function bucketLabel(iso, win, full) {
    const at = new Date(iso);
    if (Number.isNaN(at.getTime())) return String(iso);
    if (full) return at.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
    if (win === 'month') return at.toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
    return at.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
  }

  function sumRefusals(refusals) {
    return Object.values(refusals || {}).reduce((a, n) => a + (Number(n) || 0), 0);
  }

  /**
   * Bars of the calls the upstream answered (charged, then answered but not charged, in a
   * lighter shade), refusals stacked above, a revenue line, an error-rate strip.
   */
  function drawChart(svg, id, series) {
    const W = 720;
    const H = 240;
    const M = { left: 44, right: 84, top: 24, bottom: 48 };
    const stripH = 8;
    const plotW = W - M.left - M.right;
    const plotH = H - M.top - M.bottom - stripH - 6;
    const baseY = M.top + plotH;
    const stripY = baseY + 4;
    const buckets = series.buckets || [];
    const n = Math.max(buckets.length, 1);
    const band = plotW / n;
    const barW = Math.max(1, band * 0.72);
    const win = series.window || state.window;

    const maxCount = niceCeil(Math.max(0, ...buckets.map((b) => bucketCalls(b).calls + sumRefusals(b.refusals))));
    // The largest bucket's revenue, compared exactly; heights only then go through Number.
    let maxRevenue = null;
    let maxRevenueMicro = 0n;
    for (const b of buckets) {
      const v = toMicro(b.revenueUsdc);
      if (v != null && v > maxRevenueMicro) {
        maxRevenueMicro = v;
        maxRevenue = fromMicro(v);
      }
    }
    const y = (count) => baseY - (count / maxCount) * plotH;

    const unit = { 60: 'minute', 3600: 'hour', 86400: 'day' }[series.bucketSeconds] || WINDOWS[win]?.unit || 'bucket';
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    svg.setAttribute('preserveAspectRatio', 'xMidYMid meet');
    svg.setAttribute('aria-label', `${id}: calls, refusals and revenue per ${unit}, ${WINDOWS[win]?.label || win}`);

    const nodes = [s('title', { text: `${id}: calls, refusals and revenue per ${unit}` })];

    // Grid and left axis (counts).
    for (const fraction of [0, 0.5, 1]) {
      const value = maxCount * fraction;
      const gy = y(value);
      nodes.push(s('line', { class: fraction === 0 ? 'axis' : 'grid', x1: M.left, x2: M.left + plotW, y1: gy, y2: gy }));
      if (Number.isInteger(value)) {
        nodes.push(s('text', { class: 'tick tick-left', x: M.left - 6, y: gy + 4, 'text-anchor': 'end', text: String(value) }));
      }
    }
    nodes.push(s('text', { class: 'axis-title', x: 4, y: 10, text: 'calls' }));

    // Right axis (revenue): its largest bucket, as the API wrote it.
    nodes.push(s('text', { class: 'tick tick-revenue', x: M.left + plotW + 6, y: M.top + 4, text: maxRevenue ? maxRevenue : '0' }));
    nodes.push(s('text', { class: 'tick tick-revenue', x: M.left + plotW + 6, y: baseY + 4, text: '0' }));
    nodes.push(s('text', { class: 'axis-title axis-title-revenue', x: W - 4, y: 10, 'text-anchor': 'end', text: 'revenue USDC' }));

    const points = [];
    const labelEvery = Math.max(1, Math.ceil(n / 6));
    buckets.forEach((b, i) => {
      const x = M.left + i * band;
      const barX = x + (band - barW) / 2;
      const { calls, answered, charged, uncharged, errors } = bucketCalls(b);
      const refused = sumRefusals(b.refusals);
      const codes = Object.entries(b.refusals || {}).filter(([, k]) => k > 0).map(([code, k]) => `${code} ${k}`).join(', ');
      const tip = [
        bucketLabel(b.start, win, true),
        `${calls} call${calls === 1 ? '' : 's'}: ${charged} charged, ${uncharged} answered but not charged`,
        `revenue ${b.revenueUsdc ?? '0'} USDC`,
        `refusals ${refused}${codes ? ` (${codes})` : ''}`,
        answered ? `upstream errors ${errors} of ${answered} (${percent(errors / answered)})` : 'no upstream answers',
      ].join('\n');

      const group = s('g', { class: 'bucket', 'data-start': b.start });
      group.append(s('rect', { class: 'hit', x, y: M.top, width: band, height: plotH }, s('title', { text: tip })));
      // The whole calls bar in the charged colour, its uncharged top part over it.
      const callsTop = y(calls);
      group.append(s('rect', {
        class: 'bar-calls', x: barX, y: callsTop, width: barW, height: baseY - callsTop,
        'data-calls': calls, 'data-committed': charged,
      }, s('title', { text: tip })));
      if (uncharged > 0) {
        group.append(s('rect', {
          class: 'bar-uncommitted', x: barX, y: callsTop, width: barW, height: y(charged) - callsTop, 'data-uncharged': uncharged,
        }, s('title', { text: tip })));
      }
      if (refused > 0) {
        const top = y(calls + refused);
        group.append(s('rect', { class: 'bar-refusals', x: barX, y: top, width: barW, height: callsTop - top, 'data-refusals': refused }, s('title', { text: tip })));
      }
      const mark = s('rect', {
        class: answered ? (errors ? 'error-mark error-mark-bad' : 'error-mark error-mark-ok') : 'error-mark error-mark-none',
        x: barX, y: stripY, width: barW, height: stripH,
        'data-error-rate': answered ? (errors / answered).toFixed(4) : null,
      }, s('title', { text: tip }));
      if (answered && errors) mark.style.opacity = String(0.35 + 0.65 * Math.min(1, errors / answered));
      group.append(mark);
      nodes.push(group);

      const rev = maxRevenueMicro > 0n ? Number(toMicro(b.revenueUsdc) ?? 0n) / Number(maxRevenueMicro) : 0;
      points.push(`${(x + band / 2).toFixed(1)},${(baseY - rev * plotH).toFixed(1)}`);

      if (i % labelEvery === 0) {
        nodes.push(s('line', { class: 'tick-mark', x1: x, x2: x, y1: stripY + stripH + 2, y2: stripY + stripH + 6 }));
        nodes.push(s('text', { class: 'tick tick-bottom', x, y: H - 10, 'text-anchor': 'middle', text: bucketLabel(b.start, win, false) }));
      }
    });
    if (points.length) nodes.push(s('polyline', { class: 'revenue-line', points: points.join(' ') }));
    if (!buckets.length) {
      nodes.push(s('text', { class: 'chart-empty', x: M.left + plotW / 2, y: M.top + plotH / 2, 'text-anchor': 'middle', text: 'no data' }));
    }
    svg.replaceChildren(...nodes);
  }

  function renderTopSpenders(top) {
    syncRows($('top-tokens'), 'data-token-id', top.tokens || [], (t) => t.tokenId, (t) => ({
      cells: [
        cells.id(t.tokenId),
        cells.id(t.buyerId),
        cells.text(t.serviceId || 'any', { cls: 'mono' }),
        cells.text(t.buyerTag || BLANK, { title: t.buyerTag || null, cls: 'tag-cell' }),
        cells.money(t.spentUsdc),
        cells.text(String(t.calls ?? 0), { cls: 'num' }),
        cells.buttons([{ cls: 'btn-danger revoke', label: 'Revoke', aria: `Revoke token ${t.tokenId}` }]),
      ],
    }), 'No spending in this window.');
    syncRows($('top-buyers'), 'data-buyer-id', top.buyers || [], (b) => b.buyerId, (b) => ({
      cells: [
        cells.id(b.buyerId),
        cells.money(b.spentUsdc),
        cells.text(String(b.calls ?? 0), { cls: 'num' }),
        cells.buttons([
          { cls: 'open', label: 'Open', aria: `Open buyer ${b.buyerId}` },
          { cls: 'btn-danger revoke', label: 'Revoke all', aria: `Revoke every token of buyer ${b.buyerId}` },
        ]),
      ],
    }), 'No spending in this window.');
  }

  /** The newest 50 holds (one newest-first page); "50+" when there are more. */
  function renderHolds(page) {
    const holds = (page.charges || []).slice(0, SHOWN_ROWS);
    setText($('holds-count'), page.nextCursor ? `${holds.length}+` : `${holds.length}`);
    syncRows($('holds'), 'data-charge-id', holds, (c) => c.chargeId, (c) => ({
      cells: [
        cells.time(c.createdAt),
        cells.id(c.chargeId),
        cells.id(c.tokenId),
        cells.id(c.buyerId),
        cells.text(c.serviceId, { cls: 'mono' }),
        cells.money(c.heldUsdc),
      ],
      cls: c.sandbox ? 'sandbox' : null,
    }), 'No calls in flight.');
  }

  function journalParams() {
    const f = state.journal;
    return { buyerId: f.buyerId, tokenId: f.tokenId, status: f.status };
  }

  async function pollJournal(session, win, from) {
    const filters = state.journal;
    const { rows } = await newestCharges('/v1/charges', journalParams(), from);
    if (session !== state.session || win !== state.window || filters !== state.journal) return;
    // The settlement column only when a charge shown has one (most books settle none).
    const withSettlement = rows.some((c) => c.settlement);
    show($('journal-settlement'), withSettlement);
    syncRows($('journal'), 'data-charge-id', rows, (c) => c.chargeId, (c) => chargeRow(c, { withBuyer: true, withSettlement }), 'No charges match.');
  }

  function describeFilters() {
    const f = state.journal;
    const parts = [f.status ? `${f.status} charges` : 'charges of every status'];
    if (f.buyerId) parts.push(`of buyer ${f.buyerId}`);
    if (f.tokenId) parts.push(`with token ${f.tokenId}`);
    setText($('journal-filters'), `Showing ${parts.join(' ')}.`);
  }

  function applyJournal(event) {
    event.preventDefault();
    state.journal = {
      buyerId: $('journal-buyer').value.trim(),
      tokenId: $('journal-token').value.trim(),
      status: $('journal-status').value,
    };
    describeFilters();
    clearTable($('journal'));
    refreshNow();
  }

  // ----- one buyer

  async function pollBuyerDetail(session, buyerId) {
    const [buyer, keys] = await Promise.all([
      api('GET', `/v1/buyers/${seg(buyerId)}`),
      api('GET', `/v1/buyers/${seg(buyerId)}/keys`),
    ]).catch((err) => {
      if (session === state.session && state.buyerId === buyerId) {
        setText($('buyer-detail-status'), `Could not refresh: ${err.message}`);
      }
      throw err;
    });
    if (session !== state.session || state.buyerId !== buyerId) return;
    renderBuyerDetail(buyer, keys);
  }

  function renderBuyerDetail(buyer, keys) {
    setText($('buyer-detail-status'), '');
    setText($('buyer-detail-id'), buyer.buyerId);
    setAttr($('buyer-detail-id'), 'title', buyer.buyerId);
    const a = buyer.account;
    renderAccount(a, { available: 'buyer-available', rest: ['buyer-balance', 'buyer-held', 'buyer-spent-today', 'buyer-daily-limit', 'buyer-tier'] });
    if (a) {
      setText($('buyer-balance'), usdc(a.balanceUsdc));
      setText($('buyer-held'), usdc(a.heldUsdc));
      setText($('buyer-spent-today'), usdc(a.spentTodayUsdc));
      setText($('buyer-daily-limit'), usdc(a.dailyLimitUsdc));
      setText($('buyer-tier'), a.tier);
    }
    syncRows($('buyer-tokens'), 'data-token-id', buyer.tokens || [], (t) => t.tokenId, (t) => tokenRow(t, 'revoke', 'Revoke', 'Revoke this token'), 'No tokens.');
    syncRows($('buyer-keys'), 'data-key-id', keys.keys || [], (k) => k.keyId, (k) => {
      const st = k.revokedAt ? 'revoked' : 'active';
      return {
        cells: [
          cells.id(k.keyId),
          cells.text(k.label || BLANK, { title: k.label || null }),
          cells.text(k.services && k.services.length ? k.services.join(', ') : 'any', { cls: 'mono' }),
          cells.money(k.maxLimitUsdc || null),
          cells.time(k.createdAt),
          cells.time(k.lastUsedAt),
          cells.text(st, { cls: `key-state state-${st}`, title: k.revokedAt || null }),
          cells.buttons([{ cls: 'btn-danger revoke', label: 'Revoke', disabled: Boolean(k.revokedAt), aria: `Revoke buyer key ${k.keyId}` }]),
        ],
        cls: `state-${st}`,
      };
    }, 'No buyer keys.');
    show($('buyer-detail'), true);
  }

  async function openBuyer(buyerId) {
    forgetSecrets();
    const id = (buyerId ?? $('buyer-id').value).trim();
    if (!id) {
      failure('Enter a buyer id.');
      return;
    }
    $('buyer-id').value = id;
    const session = state.session;
    const button = $('buyer-open');
    button.disabled = true;
    try {
      const [buyer, keys] = await Promise.all([
        api('GET', `/v1/buyers/${seg(id)}`),
        api('GET', `/v1/buyers/${seg(id)}/keys`),
      ]);
      if (session !== state.session) return;
      if (state.buyerId !== id) {
        clearTable($('buyer-tokens'));
        clearTable($('buyer-keys'));
      }
      state.buyerId = id;
      renderBuyerDetail(buyer, keys);
      clearMessages();
    } catch (err) {
      if (session !== state.session) return;
      failure(err.message);
      if (err.status === 401) expireSession();
    } finally {
      button.disabled = false;
    }
  }

  function currentBuyer() {
    if (!state.buyerId) {
      failure('Open a buyer first.');
      return null;
    }
    return state.buyerId;
  }

  function revokeToken(tokenId) {
    return act(
      `Revoke token ${tokenId}? Calls with it will be refused at once.`,
      { yes: 'Revoke token', danger: true },
      async () => {
        await api('POST', `/v1/tokens/${seg(tokenId)}/revoke`);
        return `Token ${tokenId} revoked.`;
      },
    );
  }

  function revokeBuyer(buyerId) {
    return act(
      `Revoke every token of buyer ${buyerId}? Calls with any of them will be refused at once.`,
      { yes: 'Revoke all', danger: true },
      async () => {
        const answer = await api('POST', `/v1/buyers/${seg(buyerId)}/revoke`);
        return `Revoked ${answer.revokedTokens} token${answer.revokedTokens === 1 ? '' : 's'} of buyer ${buyerId}.`;
      },
    );
  }

  function deposit(event) {
    event.preventDefault();
    const buyerId = currentBuyer();
    if (!buyerId) return;
    const amountUsdc = $('deposit-amount').value.trim();
    const reference = $('deposit-reference').value.trim();
    if (!amountUsdc) {
      failure('Enter an amount in USDC.');
      return;
    }
    const body = { amountUsdc };
    if (reference) body.reference = reference;
    act(
      `Deposit ${amountUsdc} USDC to buyer ${buyerId}${reference ? ` (reference ${reference})` : ''}? Their balance goes up at once.`,
      { yes: 'Deposit' },
      async () => {
        const d = await api('POST', `/v1/buyers/${seg(buyerId)}/deposits`, { body });
        $('deposit-amount').value = '';
        $('deposit-reference').value = '';
        return d.replayed
          ? `Deposit ${d.depositId} was already recorded (same reference): balance ${d.balanceUsdc} USDC.`
          : `Deposited ${d.amountUsdc} USDC to ${d.buyerId}: balance ${d.balanceUsdc} USDC.`;
      },
    );
  }

  function setTier(event) {
    event.preventDefault();
    const buyerId = currentBuyer();
    if (!buyerId) return;
    const raw = $('tier-value').value.trim();
    const tier = Number(raw);
    if (!raw || !Number.isInteger(tier) || tier < 1) {
      failure('The tier is a whole number from 1.');
      return;
    }
    act(
      `Set buyer ${buyerId} to tier ${tier}? Their daily spending limit changes at once.`,
      { yes: 'Set tier' },
      async () => {
        const buyer = await api('PUT', `/v1/buyers/${seg(buyerId)}/tier`, { body: { tier } });
        return `Buyer ${buyerId} is now tier ${buyer.account ? buyer.account.tier : tier}.`;
      },
    );
  }

  function createKey(event) {
    event.preventDefault();
    const buyerId = currentBuyer();
    if (!buyerId) return;
    const label = $('key-label').value.trim();
    const services = $('key-services').value.split(',').map((x) => x.trim()).filter(Boolean);
    const maxLimitUsdc = $('key-max').value.trim();
    const body = {};
    if (label) body.label = label;
    if (services.length) body.services = services;
    if (maxLimitUsdc) body.maxLimitUsdc = maxLimitUsdc;
    const scope = [
      services.length ? `for ${services.join(', ')}` : 'for any service',
      maxLimitUsdc ? `caps up to ${maxLimitUsdc} USDC` : 'any cap the balance allows',
    ].join(', ');
    act(
      `Create a buyer key${label ? ` "${label}"` : ''} for buyer ${buyerId} (${scope})? Whoever holds it can issue tokens that spend this buyer's balance.`,
      { yes: 'Create key' },
      async () => {
        const created = await api('POST', `/v1/buyers/${seg(buyerId)}/keys`, { body });
        setText($('new-buyer-key-value'), created.key);
        setText($('new-buyer-key-id'), created.keyId);
        show($('new-buyer-key'), true);
        $('key-label').value = '';
        $('key-services').value = '';
        $('key-max').value = '';
        return `Buyer key ${created.keyId} created for ${created.buyerId}.`;
      },
    );
  }

  function revokeKey(keyId) {
    const buyerId = currentBuyer();
    if (!buyerId) return;
    act(
      `Revoke buyer key ${keyId} of buyer ${buyerId}? Requests with it will be refused at once (tokens it issued stay valid).`,
      { yes: 'Revoke key', danger: true },
      async () => {
        await api('POST', `/v1/buyers/${seg(buyerId)}/keys/${seg(keyId)}/revoke`);
        return `Buyer key ${keyId} revoked.`;
      },
    );
  }

  // ---------------------------------------------------------------- wiring

  /** One click listener per table: the row's data attribute names what to act on. */
  function onRowButton(tableId, attr, handlers) {
    $(tableId).addEventListener('click', (event) => {
      const button = event.target.closest('button');
      if (!button || button.disabled) return;
      const tr = button.closest('tr');
      const key = tr && tr.getAttribute(attr);
      if (key == null) return;
      for (const [cls, handler] of Object.entries(handlers)) {
        if (button.classList.contains(cls)) {
          handler(key);
          return;
        }
      }
    });
  }

  function copyFrom(getText) {
    const text = getText();
    if (!text) return;
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(text).then(() => notice('Copied.'), () => failure('Copy failed: select the text and copy it.'));
    } else {
      failure('Copy is not available here: select the text and copy it.');
    }
  }

  function wire() {
    wireConfirm();

    $('login-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      const key = $('login-key').value.trim();
      setText($('login-error'), '');
      if (!key) {
        setText($('login-error'), 'Enter a key.');
        return;
      }
      const button = $('login-submit');
      button.disabled = true;
      try {
        await login(key);
      } catch (err) {
        setText($('login-error'), err.status === 401 ? 'Wrong or revoked key' : err.message);
      } finally {
        button.disabled = false;
      }
    });
    $('logout').addEventListener('click', () => logout());

    // Buyer
    $('token-form').addEventListener('submit', issueToken);
    $('panic').addEventListener('click', panic);
    onRowButton('tokens', 'data-token-id', { kill: killToken });
    $('buyer-charges-status').addEventListener('change', chooseBuyerStatus);
    $('buyer-csv').addEventListener('click', () => csvButton($('buyer-csv'), '/v1/me/charges.csv', buyerChargesParams()));
    $('new-token-copy').addEventListener('click', () => copyFrom(() => $('new-token-jwt').value));
    $('new-token-hide').addEventListener('click', forgetSecrets);

    // Seller
    for (const name of Object.keys(WINDOWS)) {
      $(`window-${name}`).addEventListener('click', () => chooseWindow(name));
    }
    $('journal-form').addEventListener('submit', applyJournal);
    $('journal-csv').addEventListener('click', () => csvButton($('journal-csv'), '/v1/charges.csv', { ...journalParams(), from: windowStart() }));
    onRowButton('top-tokens', 'data-token-id', { revoke: revokeToken });
    onRowButton('top-buyers', 'data-buyer-id', { revoke: revokeBuyer, open: (id) => openBuyer(id) });
    $('buyer-form').addEventListener('submit', (event) => {
      event.preventDefault();
      openBuyer();
    });
    onRowButton('buyer-tokens', 'data-token-id', { revoke: revokeToken });
    onRowButton('buyer-keys', 'data-key-id', { revoke: revokeKey });
    $('buyer-revoke').addEventListener('click', () => {
      const id = currentBuyer();
      if (id) revokeBuyer(id);
    });
    $('deposit-form').addEventListener('submit', deposit);
    $('tier-form').addEventListener('submit', setTier);
    $('key-form').addEventListener('submit', createKey);
    $('new-buyer-key-copy').addEventListener('click', () => copyFrom(() => $('new-buyer-key-value').textContent));
    $('new-buyer-key-hide').addEventListener('click', forgetSecrets);
  }

  async function start() {
    wire();
    let stored = null;
    try {
      stored = sessionStorage.getItem(KEY_STORAGE);
    } catch (_) {
      stored = null;
    }
    if (!stored) {
      $('login-key').focus();
      return;
    }
    try {
      await login(stored);
    } catch (err) {
      logout(err.status === 401 ? 'Wrong or revoked key' : err.message);
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
