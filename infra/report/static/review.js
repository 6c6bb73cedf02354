// Decision controls for the PAIR-X review site, added by `pairx review` (infra/report/server.py).
// Plain JavaScript, no build step. On a night page (/report/nights/<slug>/...) it asks the server
// which upload each `section.upload` is (a `data-query` attribute with its URI and, for one
// detection of a camera-trap frame, a `data-detection` attribute with its detection id; else its id
// `u<N>`: the N-th upload of the night), shows the latest decision on each, and records new ones.
// Keys on the current upload: 1 2 3 accept that candidate, n new individual, x no match,
// s unsure, u undo, j / k next / previous upload. Opened from disk, the page never loads this file.
(function () {
  'use strict';
  var match = location.pathname.match(/^\/report\/nights\/([^/]+)\//);
  if (!match || !window.fetch) return;
  var slug = decodeURIComponent(match[1]);
  var params = new URLSearchParams(location.search);
  if (params.get('token')) sessionStorage.setItem('pairx-review-token', params.get('token'));
  var token = sessionStorage.getItem('pairx-review-token');
  var blocks = [];        // {section, upload, status}
  var latest = {};        // upload key (keyOf) -> latest decision row
  var current = null;     // the block keys act on

  var style = document.createElement('style');
  style.textContent =
    '#pairx-bar{position:sticky;top:0;z-index:5;background:#f4f4f4;border-bottom:1px solid #ccc;padding:6px 8px;font-size:14px}' +
    '#pairx-bar input{font:inherit;width:12em} #pairx-message{margin-left:12px}' +
    '.pairx-decide{margin-top:6px;font-size:13px} .pairx-decide button{font:inherit;margin:2px 4px 2px 0}' +
    '.pairx-status{display:block;margin-top:4px;overflow-wrap:anywhere}' +
    'section.upload{scroll-margin-top:72px} section.upload.pairx-current{background:#fffbe8} section.upload[data-decision] .pairx-status{font-weight:600}' +
    '.pairx-error{color:#a00}';
  document.head.appendChild(style);

  var bar = document.createElement('div');
  bar.id = 'pairx-bar';
  bar.innerHTML = "<label>Reviewer <input id='pairx-reviewer' autocomplete='name' required></label>" +
    "<span id='pairx-message' role='status' aria-live='polite'></span>" +
    "<div><small>Keys on the current upload: <kbd>1</kbd> <kbd>2</kbd> <kbd>3</kbd> accept candidate, " +
    "<kbd>n</kbd> new individual, <kbd>x</kbd> no match, <kbd>s</kbd> unsure, <kbd>u</kbd> undo, " +
    "<kbd>j</kbd>/<kbd>k</kbd> next/previous upload.</small></div>";
  document.body.insertBefore(bar, document.body.firstChild);
  var reviewerInput = document.getElementById('pairx-reviewer');
  reviewerInput.value = localStorage.getItem('pairx-reviewer') || '';
  reviewerInput.addEventListener('change', function () {
    localStorage.setItem('pairx-reviewer', reviewerInput.value.trim());
  });

  function say(text, isError) {
    var node = document.getElementById('pairx-message');
    node.textContent = text;
    node.className = isError ? 'pairx-error' : '';
  }

  function describe(row) {
    if (!row || row.decision === 'undo') {
      return row ? 'undone by ' + row.reviewer + ', ' + row.decided_at.slice(0, 16).replace('T', ' ') + ' UTC: pending'
                 : 'pending';
    }
    var what = {match: 'match', new_individual: 'new individual', no_match: 'no match', unsure: 'unsure'}[row.decision];
    if (row.individual) what += ': ' + row.individual;
    if (row.decision === 'match' && row.rank !== null && row.rank !== undefined) what += ' (candidate ' + (row.rank + 1) + ')';
    return what + ', by ' + row.reviewer + ', ' + row.decided_at.slice(0, 16).replace('T', ' ') + ' UTC';
  }

  function keyOf(query, detectionId) {  // one upload: a photo, or one detection in it
    return query + '\n' + (detectionId || '');
  }

  function render(block) {
    var row = latest[keyOf(block.upload.query, block.upload.detection_id)];
    block.status.textContent = describe(row);
    if (row && row.decision !== 'undo') block.section.setAttribute('data-decision', row.decision);
    else block.section.removeAttribute('data-decision');
  }

  function setCurrent(block, scroll) {
    if (current) current.section.classList.remove('pairx-current');
    current = block;
    if (!block) return;
    block.section.classList.add('pairx-current');
    if (scroll) { block.section.focus(); block.section.scrollIntoView({block: 'start'}); }
  }

  function decide(block, body) {
    var reviewer = reviewerInput.value.trim();
    if (!reviewer) { say('Type your name as reviewer first.', true); reviewerInput.focus(); return Promise.resolve(); }
    localStorage.setItem('pairx-reviewer', reviewer);
    body.query = block.upload.query;
    if (block.upload.detection_id) body.detection_id = block.upload.detection_id;
    body.reviewer = reviewer;
    body.model_id = modelId;
    if (block.upload.night_run_id) body.night_run_id = block.upload.night_run_id;
    var headers = {'Content-Type': 'application/json'};
    if (token) headers.Authorization = 'Bearer ' + token;
    return fetch('/api/decisions', {method: 'POST', headers: headers, body: JSON.stringify(body)})
      .then(function (response) {
        return response.json().then(function (data) { return {ok: response.ok, data: data}; });
      })
      .then(function (result) {
        if (!result.ok) { say(result.data.error || 'refused', true); return; }
        latest[keyOf(block.upload.query, block.upload.detection_id)] = result.data.decision;
        render(block);
        say('Recorded: ' + describe(result.data.decision));
      })
      .catch(function (error) { say('Not recorded: ' + error, true); });
  }

  function accept(block, position) {  // position: 0-based among the cards shown
    var candidate = block.upload.candidates[position];
    if (!candidate) { say('This upload has no candidate ' + (position + 1) + '.', true); return; }
    decide(block, {decision: 'match', rank: candidate.rank});
  }

  function newIndividual(block) {
    var name = window.prompt('Name of the new individual');
    if (name && name.trim()) decide(block, {decision: 'new_individual', individual: name.trim()});
  }

  function controls(block) {
    var box = document.createElement('div');
    box.className = 'pairx-decide';
    var buttons = block.upload.candidates.slice(0, 3).map(function (c, position) {
      return ["accept " + (position + 1) + (c.individual ? ' (' + c.individual + ')' : ''),
              function () { accept(block, position); }];
    }).concat([
      ['new individual', function () { newIndividual(block); }],
      ['no match', function () { decide(block, {decision: 'no_match'}); }],
      ['unsure', function () { decide(block, {decision: 'unsure'}); }],
      ['undo', function () { decide(block, {decision: 'undo'}); }]
    ]);
    buttons.forEach(function (item) {
      var button = document.createElement('button');
      button.type = 'button';
      button.textContent = item[0];
      button.addEventListener('click', function () { setCurrent(block, false); item[1](); });
      box.appendChild(button);
    });
    block.status = document.createElement('span');
    block.status.className = 'pairx-status';
    box.appendChild(block.status);
    (block.section.querySelector('.query') || block.section).appendChild(box);
  }

  function blockOf(node) {
    var section = node && node.closest ? node.closest('section.upload') : null;
    for (var i = 0; i < blocks.length; i++) if (blocks[i].section === section) return blocks[i];
    return null;
  }

  window.addEventListener('keydown', function (event) {
    if (!blocks.length || event.altKey || event.ctrlKey || event.metaKey) return;
    if (/INPUT|TEXTAREA|SELECT/.test(event.target.tagName)) return;
    var key = event.key;
    if ('123nxsujk'.indexOf(key) < 0 || key.length !== 1) return;
    event.preventDefault();
    event.stopImmediatePropagation();  // the page's own `n` (next page) yields to "new individual"
    var block = blockOf(document.activeElement) || current || blocks[0];
    if (key === 'j' || key === 'k') {
      var at = blocks.indexOf(block);
      if (current === null && blocks.indexOf(blockOf(document.activeElement)) < 0) at = key === 'j' ? -1 : 0;
      setCurrent(blocks[Math.max(0, Math.min(blocks.length - 1, at + (key === 'j' ? 1 : -1)))], true);
      return;
    }
    setCurrent(block, false);
    if (key === '1' || key === '2' || key === '3') accept(block, Number(key) - 1);
    else if (key === 'n') newIndividual(block);
    else if (key === 'x') decide(block, {decision: 'no_match'});
    else if (key === 's') decide(block, {decision: 'unsure'});
    else if (key === 'u') decide(block, {decision: 'undo'});
  }, true);

  var modelId = null;
  fetch('/api/night?slug=' + encodeURIComponent(slug))
    .then(function (response) { if (!response.ok) throw new Error('no night ' + slug); return response.json(); })
    .then(function (night) {
      modelId = night.model_id;
      var byNumber = {}, byQuery = {};
      night.uploads.forEach(function (u) { byNumber[u.number] = u; byQuery[keyOf(u.query, u.detection_id)] = u; });
      Array.prototype.forEach.call(document.querySelectorAll('section.upload'), function (section) {
        var named = section.dataset.query || section.dataset.upload || section.dataset.uri;
        var upload = named ? byQuery[keyOf(named, section.dataset.detection)] : null;
        var number = (section.id.match(/^u(\d+)$/) || [])[1] || section.dataset.number;
        if (!upload && number) upload = byNumber[Number(number)];
        if (!upload || !upload.night_run_id) return;  // pairs-only nights (`explain`) have nothing to decide
        var block = {section: section, upload: upload, status: null};
        controls(block);
        section.addEventListener('focusin', function () { setCurrent(block, false); });
        blocks.push(block);
      });
      var runs = {};
      blocks.forEach(function (b) { if (b.upload.night_run_id) runs[b.upload.night_run_id] = true; });
      return Promise.all(Object.keys(runs).map(function (run) {
        return fetch('/api/decisions?night=' + encodeURIComponent(run)).then(function (r) { return r.json(); });
      }));
    })
    .then(function (answers) {
      (answers || []).forEach(function (answer) {
        answer.latest.forEach(function (row) { latest[keyOf(row.query, row.detection_id)] = row; });
      });
      blocks.forEach(render);
      document.documentElement.setAttribute('data-pairx-review', 'ready');
      document.dispatchEvent(new CustomEvent('pairx-review-ready'));
    })
    .catch(function (error) { say('Decisions unavailable: ' + error.message, true); });
})();
