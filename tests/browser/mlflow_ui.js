#!/usr/bin/env node
// Headless check of the MLflow UI's runs page of one experiment (driven by tests/browser_ui.py).
//
//   node mlflow_ui.js '{"base_url": "http://127.0.0.1:5000", "experiment": "sweep", "expect": ["tau-0.3"],
//                       "filter": "tags.pareto = '\''true'\''", "screenshot": "/tmp/ui.png"}'
//   (or the JSON on stdin with the argument "-")
//
// Arguments (JSON): base_url, experiment (name or id), expect (texts that must be visible), screenshot (PNG path);
// optional: filter (typed into the runs search box and submitted), absent (texts that must NOT be visible),
// expand (true: click the expander of every top-level run, so runs nested under a parent run are drawn),
// timeout_ms (each wait; default 60000), chromium (browser binary; default $CAP_CHROMIUM or /usr/bin/chromium),
// link (a URL to open instead of the experiment's runs page, e.g. one `cap ui` printed), table (false: the link is
// not a runs table, e.g. a run's page; only the texts are checked).
//
// Prints one JSON object on stdout: ok, found, missing, present_but_absent_expected, run_names (the run-name links
// rendered in the runs table), matching_runs (the table's "N matching runs"), url, screenshot, timings, versions.
// Exit 0: every expected text visible and no `absent` text visible. Exit 1: the page was checked, but a text was
// missing or an absent one was there. Exit 2: the check could not be made (bad arguments, browser did not start,
// unknown experiment, rejected filter, table never rendered); `error` says why. A screenshot is attempted in all
// cases once the page is open.
//
// The UI is a React SPA: network idle says nothing about what is rendered. Readiness is "the table agrees with
// itself": the footer "N matching runs" is there and N run-name links are rendered (or their number has stopped
// changing when N is more than one page renders), after the runs/search response for this experiment (and, with a
// filter, the response to exactly that filter) has arrived.
'use strict';

const fs = require('fs');
const path = require('path');

const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
  '--disable-background-networking'];

function emit(result, code) {
  process.stdout.write(JSON.stringify(result, null, 2) + '\n');
  if (code !== 0) process.stderr.write(`mlflow_ui.js: ${result.error || 'check failed: missing ' +
    JSON.stringify(result.missing) + ', present but expected absent ' +
    JSON.stringify(result.present_but_absent_expected)}\n`);
  process.exit(code);
}

function readArgs() {
  const raw = process.argv[2] === '-' || process.argv.length < 3 ? fs.readFileSync(0, 'utf8') : process.argv[2];
  let a;
  try { a = JSON.parse(raw); } catch (e) { throw new Error(`arguments are not JSON: ${e.message}`); }
  for (const k of ['base_url', 'experiment', 'screenshot']) {
    if (typeof a[k] !== 'string' || !a[k]) throw new Error(`argument "${k}" (a non-empty string) is required`);
  }
  a.expect = a.expect || [];
  a.absent = a.absent || [];
  if (!Array.isArray(a.expect) || !Array.isArray(a.absent)) throw new Error('"expect" and "absent" must be lists');
  a.base_url = a.base_url.replace(/\/+$/, '');
  a.timeout_ms = Number(a.timeout_ms || 60000);
  a.chromium = a.chromium || process.env.CAP_CHROMIUM ||
    ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => fs.existsSync(p)) || '/usr/bin/chromium';
  return a;
}

async function resolveExperiment(a) {
  const api = `${a.base_url}/ajax-api/2.0/mlflow/experiments`;
  const url = /^\d+$/.test(a.experiment) ? `${api}/get?experiment_id=${a.experiment}`
    : `${api}/get-by-name?experiment_name=${encodeURIComponent(a.experiment)}`;
  let resp;
  try {
    resp = await fetch(url, { signal: AbortSignal.timeout(a.timeout_ms) });
  } catch (e) {
    throw new Error(`MLflow server at ${a.base_url} not reachable: ${e.cause ? e.cause.message : e.message}`);
  }
  const body = await resp.text();
  if (!resp.ok) throw new Error(`experiment "${a.experiment}" not found on ${a.base_url} (HTTP ${resp.status}: ` +
    `${body.slice(0, 300)})`);
  const exp = JSON.parse(body).experiment;
  return { id: exp.experiment_id, name: exp.name };
}

// What the runs table shows now, read in the page.
function tableState() {
  const text = document.body ? document.body.innerText : '';
  const m = text.match(/(\d+)\s+matching runs?\b/);
  const links = [...document.querySelectorAll('[role="gridcell"] a[href*="/runs/"]')]
    .filter((el) => el.getClientRects().length > 0);
  const err = text.match(/Request error\s*\n([^\n]*)/);
  return { count: m ? Number(m[1]) : null, names: links.map((el) => el.innerText.trim()),
    error: err ? err[1] : null };
}

// Wait until the table agrees with itself and has not changed for `stableMs` (3 s when it still looks like
// `before`, the state before a search: a filter that leaves the same runs, or a re-render that has not come yet).
async function waitTable(page, timeoutMs, what, before = null, stableMs = 750) {
  const deadline = Date.now() + timeoutMs;
  let last = null; let since = 0; let state = null;
  while (Date.now() < deadline) {
    state = await page.evaluate(tableState);
    if (state.error) throw new Error(`${what}: the UI shows "Request error: ${state.error}"`);
    const key = JSON.stringify(state);
    if (key !== last) { last = key; since = Date.now(); }
    const consistent = state.count !== null && (state.names.length === state.count ||
      (state.names.length > 0 && state.names.length < state.count && Date.now() - since > 3000));
    const needed = before !== null && key === JSON.stringify(before) ? 3000 : stableMs;
    if (consistent && Date.now() - since >= needed) return state;
    await page.waitForTimeout(250);
  }
  throw new Error(`${what}: runs table not ready after ${timeoutMs / 1000} s (last seen: ` +
    `${JSON.stringify(state)}; page ${page.url()})`);
}

// A runs/search response of this experiment (and with this filter, when given; undefined = any).
function isRunsSearch(resp, expId, filter) {
  if (!resp.url().includes('/mlflow/runs/search')) return false;
  let body;
  try { body = JSON.parse(resp.request().postData() || '{}'); } catch { return false; }
  if (!(body.experiment_ids || []).includes(expId)) return false;
  return filter === undefined || (body.filter || '') === filter;
}

async function searchError(resp) {
  if (resp.ok()) return null;
  let msg = '';
  try { msg = (await resp.json()).message || ''; } catch { msg = (await resp.text().catch(() => '')).slice(0, 300); }
  return `HTTP ${resp.status()}${msg ? ': ' + msg : ''}`;
}

async function main() {
  const t0 = Date.now();
  const secs = (t) => Math.round((Date.now() - t) / 100) / 10;
  let a;
  try { a = readArgs(); } catch (e) { emit({ ok: false, error: e.message }, 2); }
  const result = { ok: false, base_url: a.base_url, experiment: a.experiment, filter: a.filter || null,
    expect: a.expect, absent: a.absent, found: [], missing: [...a.expect], present_but_absent_expected: [],
    run_names: [], matching_runs: null, url: null, screenshot: path.resolve(a.screenshot), timings: {},
    chromium: a.chromium, browser_version: null, playwright_version: null, error: null };
  let playwright;
  try {
    playwright = require('playwright-core');
    result.playwright_version = require('playwright-core/package.json').version;
  } catch (e) {
    emit({ ...result, error: `playwright-core not installed in ${__dirname} (run: npm ci): ${e.message}` }, 2);
  }
  if (!fs.existsSync(a.chromium)) emit({ ...result, error: `no chromium at ${a.chromium} (apt-get install chromium)` }, 2);

  let browser; let page; let code = 2;
  try {
    const exp = await resolveExperiment(a);
    result.experiment_id = exp.id; result.experiment_name = exp.name;

    let t = Date.now();
    browser = await playwright.chromium.launch({ executablePath: a.chromium, headless: true, args: FLAGS,
      timeout: a.timeout_ms });
    result.browser_version = browser.version();
    result.timings.launch_s = secs(t);
    page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
    page.setDefaultTimeout(a.timeout_ms);
    page.setDefaultNavigationTimeout(a.timeout_ms);

    // workflowType=machine_learning: MLflow 3 opens an experiment in its GenAI view by default; the runs
    // table is in the "Model training" view.
    t = Date.now();
    const table = a.table !== false;
    const firstSearch = table ? page.waitForResponse((r) => isRunsSearch(r, exp.id), { timeout: a.timeout_ms })
      : null;
    if (firstSearch) firstSearch.catch(() => {});
    await page.goto(a.link || `${a.base_url}/#/experiments/${exp.id}/runs?workflowType=machine_learning`,
      { waitUntil: 'domcontentloaded' });
    let state = { names: [], count: null };
    if (table) {
      const err0 = await searchError(await firstSearch);
      if (err0) throw new Error(`the UI's run search for experiment ${exp.id} failed: ${err0}`);
      state = await waitTable(page, a.timeout_ms, 'opening the runs page');
    }
    result.timings.load_s = secs(t);

    if (a.filter) {
      t = Date.now();
      const box = page.getByTestId('search-box');
      await box.waitFor({ state: 'visible' });
      // Typed as key strokes (fill() alone does not reach the autocomplete's state), then Enter, repeated every
      // few seconds until the UI searches with exactly this filter: the first Enter can be taken by the
      // autocomplete dropdown or come before React has the new value.
      let response = null;
      page.on('response', (r) => { if (!response && isRunsSearch(r, exp.id, a.filter)) response = r; });
      const deadline = Date.now() + a.timeout_ms;
      while (!response && Date.now() < deadline) {
        if (await box.inputValue() !== a.filter) {
          await box.click();
          await box.fill('');
          await box.pressSequentially(a.filter, { delay: 15 });
          await page.waitForTimeout(500);
        }
        await box.press('Enter');
        result.filter_submits = (result.filter_submits || 0) + 1;
        for (let i = 0; i < 20 && !response; i++) await page.waitForTimeout(250);
      }
      if (!response) throw new Error(`no run search with filter ${JSON.stringify(a.filter)} within ` +
        `${a.timeout_ms / 1000} s of submitting the search box (box holds ${JSON.stringify(await box.inputValue())})`);
      const err = await searchError(response);
      if (err) throw new Error(`MLflow rejected the filter ${JSON.stringify(a.filter)}: ${err}`);
      state = await waitTable(page, a.timeout_ms, `filtering by ${JSON.stringify(a.filter)}`, state);
      result.timings.filter_s = secs(t);
    }
    if (a.expand) {
      // child runs (a sweep's trials) are drawn collapsed under their parent; its expander is the button in
      // the run-name cell of a top-level row
      t = Date.now();
      const expanders = page.locator('.ag-row-level-0 button[data-component-id*="runnamecellrenderer"]');
      const n = await expanders.count();
      for (let i = 0; i < n; i++) await expanders.nth(i).click();
      result.expanded = n;
      if (n) state = await waitTable(page, a.timeout_ms, 'expanding nested runs', state);
      result.timings.expand_s = secs(t);
    }
    result.run_names = state.names;
    result.matching_runs = state.count;

    // Expected texts: give the page until the deadline to show them all (columns may render after the names).
    t = Date.now();
    const deadline = Date.now() + a.timeout_ms;
    let text = '';
    for (;;) {
      text = await page.evaluate(() => document.body.innerText);
      result.missing = a.expect.filter((s) => !text.includes(s));
      if (result.missing.length === 0 || Date.now() > deadline) break;
      await page.waitForTimeout(500);
    }
    result.found = a.expect.filter((s) => text.includes(s));
    result.present_but_absent_expected = a.absent.filter((s) => text.includes(s));
    result.timings.texts_s = secs(t);
    result.ok = result.missing.length === 0 && result.present_but_absent_expected.length === 0;
    code = result.ok ? 0 : 1;
  } catch (e) {
    result.error = e.message.split('\n').slice(0, 6).join('\n');
  } finally {
    if (page) {
      result.url = page.url();
      try {
        fs.mkdirSync(path.dirname(result.screenshot), { recursive: true });
        await page.screenshot({ path: result.screenshot, fullPage: true, timeout: a.timeout_ms });
      } catch (e) {
        result.screenshot_error = e.message.split('\n')[0];
        if (code !== 2) { code = 2; result.ok = false; result.error = `screenshot failed: ${result.screenshot_error}`; }
      }
    }
    if (browser) await browser.close().catch(() => {});
  }
  result.timings.total_s = secs(t0);
  emit(result, code);
}

main().catch((e) => emit({ ok: false, error: `unexpected: ${e.stack || e}` }, 2));
