# ruff: noqa: E501  (templates: one HTML element per line reads better than wrapped)
"""The dashboard's templates, stylesheet and script (rendered by jinja2 with autoescape on).

Everything a user or a job controls (task names, payloads, errors, keys, pool ids, query
parameters) reaches the page only through ``{{ … }}`` in these templates, which escapes
it. Nothing here is marked ``|safe``. The script is ours and small; the Content-Security-
Policy allows only scripts and styles served by the dashboard itself.
"""

from __future__ import annotations

from typing import Final

STYLE: Final = """\
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1b1b1b; background: #fafafa; }
header { background: #243447; color: #fff; padding: .5em 1em; display: flex; gap: 1.5em;
  align-items: baseline; }
header a { color: #fff; text-decoration: none; }
header .brand { font-weight: bold; }
header .ro { background: #a36a00; padding: 0 .4em; border-radius: 3px; }
main { padding: 1em; }
table { border-collapse: collapse; background: #fff; margin-bottom: 1em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #fff; border: 1px solid #ddd; padding: .6em; overflow: auto; max-width: 100%;
  white-space: pre-wrap; word-break: break-all; }
.state-permanently_failed, .bad { color: #b00020; }
.state-running, .good { color: #1b5e20; }
.state-retrying { color: #a36a00; }
form.inline { display: inline; }
form.filters input, form.filters select { margin-right: .6em; }
button { cursor: pointer; }
button.danger { color: #fff; background: #b00020; border: 1px solid #800018; }
.note { color: #555; }
.chart rect { fill: #b00020; }
.chart line { stroke: #999; }
"""

SCRIPT: Final = """\
// Live updates: the server sends an event when jobs are inserted (LISTEN jobs:insert)
// and every few seconds; each event re-fetches this page and swaps in its live region.
(function () {
  "use strict";
  var region = document.querySelector("[data-live]");
  var url = document.body.getAttribute("data-events");
  if (!region || !url || !window.EventSource) { return; }
  var busy = false, again = false, last = 0;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true; last = Date.now();
    fetch(window.location.href, {credentials: "same-origin"}).then(function (r) {
      return r.ok ? r.text() : null;
    }).then(function (html) {
      if (html === null) { return; }
      var doc = new DOMParser().parseFromString(html, "text/html");
      var fresh = doc.querySelector("[data-live]");
      var current = document.querySelector("[data-live]");
      if (fresh && current) { current.replaceWith(document.importNode(fresh, true)); }
    }).catch(function () {}).then(function () {
      busy = false;
      if (again) { again = false; setTimeout(refresh, 500); }
    });
  }
  var source = new EventSource(url);
  source.addEventListener("change", function () {
    setTimeout(refresh, Math.max(0, 500 - (Date.now() - last)));
  });
})();
"""

_BASE: Final = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }} · kongtask</title>
<link rel="stylesheet" href="{{ base }}/static/dashboard.css">
{% if live %}<noscript><meta http-equiv="refresh" content="10"></noscript>{% endif %}
<script src="{{ base }}/static/dashboard.js" defer></script>
</head>
<body{% if live %} data-events="{{ base }}/events"{% endif %}>
<header>
  <a class="brand" href="{{ base }}/">kongtask</a>
  <a href="{{ base }}/">Overview</a>
  <a href="{{ base }}/jobs">Jobs</a>
  <a href="{{ base }}/pools">Pools and locks</a>
  <a href="{{ base }}/cron">Cron</a>
  <span>schema {{ schema }}</span>
  {% if read_only %}<span class="ro">read-only</span>{% endif %}
</header>
<main>
<h1>{{ title }}</h1>
{% block content %}{% endblock %}
</main>
</body>
</html>
"""

_OVERVIEW: Final = """\
{% extends "base" %}
{% block content %}
<div data-live>
<table id="totals">
<tr>{% for state in states %}<th>{{ state }}</th>{% endfor %}<th>oldest ready</th></tr>
<tr>{% for state in states %}<td class="n state-{{ state }}">
<a href="{{ base }}/jobs?state={{ state }}">{{ totals[state] }}</a></td>{% endfor %}
<td class="n" id="oldest-ready">{{ oldest_ready }}</td></tr>
</table>
<p class="note" id="counted">Counted {{ counted_ago }} ago; counts are taken again every few seconds while this page is open.</p>
<h2>By task and queue</h2>
<table id="by-task">
<tr><th>task</th><th>queue</th>{% for state in states %}<th>{{ state }}</th>{% endfor %}</tr>
{% for row in counts %}
<tr><td><a href="{{ base }}/jobs?task={{ row.task|urlencode }}">{{ row.task }}</a></td>
<td>{{ row.queue if row.queue is not none else "" }}</td>
{% for state in states %}<td class="n">{% if row.count(state) %}<a href="{{ base }}/jobs?task={{ row.task|urlencode }}&amp;state={{ state }}">{{ row.count(state) }}</a>{% else %}0{% endif %}</td>{% endfor %}</tr>
{% else %}
<tr><td colspan="{{ states|length + 2 }}">The queue is empty.</td></tr>
{% endfor %}
</table>
<h2>Failed attempts per minute, last hour</h2>
<p class="note">Each job counts once, at its latest failure (derived from its backoff);
completed jobs are deleted by graphile-worker, so completions cannot be counted from
the database. {{ failures_total }} failure(s) in the hour.</p>
<svg class="chart" width="{{ 60 * 8 }}" height="64" role="img" aria-label="failures per minute">
<line x1="0" y1="60" x2="{{ 60 * 8 }}" y2="60"></line>
{% for bar in failure_bars %}<rect x="{{ bar.x }}" y="{{ 60 - bar.h }}" width="6" height="{{ bar.h }}"><title>{{ bar.label }}</title></rect>{% endfor %}
</svg>
</div>
{% endblock %}
"""

_JOBS: Final = """\
{% extends "base" %}
{% block content %}
<form class="filters" method="get" action="{{ base }}/jobs">
<label>task <input name="task" value="{{ filters.task or '' }}"></label>
<label>queue <input name="queue" value="{{ filters.queue or '' }}"></label>
<label>key <input name="key" value="{{ filters.key or '' }}"></label>
<label>state <select name="state">
<option value="">any</option>
{% for state in states %}<option value="{{ state }}"{% if filters.state == state %} selected{% endif %}>{{ state }}</option>{% endfor %}
</select></label>
<button type="submit" id="apply-filters">Filter</button>
</form>
{% if error %}<p class="bad" id="error">{{ error }}</p>{% endif %}
<div data-live>
{% if not read_only and bulk_actions %}
<p>Bulk, on every job matching this filter (up to id {{ bulk_max_id }}):
{% for action in bulk_actions %}<a class="bulk" href="{{ base }}/confirm?action={{ action }}&amp;{{ filter_query }}&amp;max_id={{ bulk_max_id }}">{{ action_names[action] }}</a> {% endfor %}</p>
{% endif %}
<table id="jobs">
<tr><th>id</th><th>task</th><th>queue</th><th>state</th><th>attempts</th><th>run at</th><th>key</th><th>last error</th></tr>
{% for info in jobs %}
<tr><td class="n"><a href="{{ base }}/jobs/{{ info.job.id }}">{{ info.job.id }}</a></td>
<td>{{ info.job.task_identifier }}</td><td>{{ info.job.queue_name or "" }}</td>
<td class="state-{{ info.state }}">{{ info.state }}</td>
<td class="n">{{ info.job.attempts }}/{{ info.job.max_attempts }}</td>
<td>{{ ts(info.job.run_at) }}</td><td>{{ info.job.key or "" }}</td>
<td>{{ (info.job.last_error or "")|truncate(80) }}</td></tr>
{% else %}
<tr><td colspan="8">No job matches.</td></tr>
{% endfor %}
</table>
</div>
<p>{% if after %}<a href="{{ base }}/jobs?{{ filter_query }}">First page</a> {% endif %}
{% if next_after is not none %}<a id="next-page" href="{{ base }}/jobs?{{ filter_query }}&amp;after={{ next_after }}">Next page</a>{% endif %}</p>
{% endblock %}
"""

_JOB: Final = """\
{% extends "base" %}
{% block content %}
{% if info is none %}
<p id="missing">Job {{ job_id }} is not in the queue (completed jobs are deleted).</p>
{% else %}
{% set job = info.job %}
<table id="job">
<tr><th>id</th><td>{{ job.id }}</td></tr>
<tr><th>task</th><td id="task">{{ job.task_identifier }}</td></tr>
<tr><th>state</th><td id="state" class="state-{{ info.state }}">{{ info.state }}</td></tr>
<tr><th>queue</th><td>{{ job.queue_name or "" }}</td></tr>
<tr><th>key</th><td>{{ job.key or "" }}</td></tr>
<tr><th>priority</th><td>{{ job.priority }}</td></tr>
<tr><th>attempts</th><td>{{ job.attempts }} of {{ job.max_attempts }}</td></tr>
<tr><th>run at</th><td>{{ ts(job.run_at) }}</td></tr>
<tr><th>flags</th><td>{{ (job.flags or [])|join(", ") }}</td></tr>
<tr><th>locked by</th><td>{{ job.locked_by or "" }}{% if info.lock_age is not none %} for {{ age(info.lock_age) }}{% endif %}</td></tr>
<tr><th>created</th><td>{{ ts(job.created_at) }}</td></tr>
<tr><th>updated</th><td>{{ ts(job.updated_at) }}</td></tr>
<tr><th>revision</th><td>{{ job.revision }}</td></tr>
</table>
<h2>Payload</h2>
<pre id="payload">{{ payload }}</pre>
<h2>Last error</h2>
<pre id="last-error">{{ job.last_error or "(none)" }}</pre>
{% if not read_only %}
<h2>Actions</h2>
<p>{% for action in actions %}<a class="action" id="action-{{ action }}" href="{{ base }}/confirm?action={{ action }}&amp;id={{ job.id }}">{{ action_names[action] }}</a> {% endfor %}</p>
{% endif %}
{% endif %}
{% endblock %}
"""

_CONFIRM: Final = """\
{% extends "base" %}
{% block content %}
<p id="question">{{ question }}</p>
<form method="post" action="{{ base }}/action">
<input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="action" value="{{ action }}">
{% for name, value in fields %}<input type="hidden" name="{{ name }}" value="{{ value }}">
{% endfor %}
{% if action == "reschedule" %}<label>run at (UTC) <input type="datetime-local" name="run_at" required value="{{ default_run_at }}"></label>{% endif %}
{% if action == "fail" %}<label>message <input name="message" value="Manually marked as failed from the dashboard" size="50"></label>{% endif %}
<button type="submit" id="confirm" class="danger">{{ action_names[action] }}</button>
<a href="{{ back }}">Cancel</a>
</form>
{% endblock %}
"""

_DONE: Final = """\
{% extends "base" %}
{% block content %}
<p id="result">{{ message }}</p>
<p><a id="back" href="{{ back }}">Back</a></p>
{% endblock %}
"""

_POOLS: Final = """\
{% extends "base" %}
{% block content %}
<div data-live>
<table id="pools">
<tr><th>kind</th><th>pool id</th><th>alive</th><th>jobs locked</th><th>queues locked</th>
<th>oldest lock</th><th>connected</th><th>client</th>{% if not read_only %}<th></th>{% endif %}</tr>
{% for pool in pools %}
<tr><td>{{ pool.kind }}</td><td>{{ pool.pool_id or ("…" ~ pool.id_suffix) }}</td>
<td class="{{ 'good' if pool.alive else ('bad' if pool.alive is false else '') }}">{{ {True: "alive", False: "dead", None: "unknown"}[pool.alive] }}</td>
<td class="n">{{ pool.jobs }}</td><td class="n">{{ pool.queues }}</td>
<td>{{ age(pool.oldest_lock_age) if pool.oldest_lock_age is not none else "" }}</td>
<td>{{ ts(pool.connected_at) if pool.connected_at else "" }}</td><td>{{ pool.client_addr or "" }}</td>
{% if not read_only %}<td>{% if pool.pool_id and pool.alive is not true and (pool.jobs or pool.queues) %}<a class="unlock" href="{{ base }}/confirm?action=unlock&amp;pool={{ pool.pool_id|urlencode }}">Unlock</a>{% endif %}</td>{% endif %}</tr>
{% else %}
<tr><td colspan="9">No pool holds a lock.</td></tr>
{% endfor %}
</table>
<p class="note" id="counted">Read {{ counted_ago }} ago; read again every few seconds while this page is open.</p>
<p class="note">Unlocking releases every job and queue a pool holds; do it only for a pool
you know is dead (a Node pool's liveness cannot be checked from the database).</p>
</div>
{% endblock %}
"""

_CRON: Final = """\
{% extends "base" %}
{% block content %}
<table id="cron">
<tr><th>identifier</th><th>pattern</th><th>known since</th><th>last run</th><th>next runs</th></tr>
{% for item in items %}
<tr><td>{{ item.identifier }}</td><td>{{ item.pattern or "" }}</td>
<td>{{ ts(item.known_since) if item.known_since else "" }}</td>
<td>{{ ts(item.last_execution) if item.last_execution else "never" }}</td>
<td>{{ item.next_runs|map(ts)|join(", ") if item.next_runs else "" }}</td></tr>
{% else %}
<tr><td colspan="5">No cron item has run on this database.</td></tr>
{% endfor %}
</table>
<p class="note">Last runs come from the <code>known_crontabs</code> table; next runs need the
crontab, which lives with the workers: pass <code>--crontab FILE</code> to show them.</p>
{% endblock %}
"""

_ERROR: Final = """\
{% extends "base" %}
{% block content %}
<p class="bad" id="error">{{ message }}</p>
{% endblock %}
"""

TEMPLATES: Final = {
    "base": _BASE,
    "overview": _OVERVIEW,
    "jobs": _JOBS,
    "job": _JOB,
    "confirm": _CONFIRM,
    "done": _DONE,
    "pools": _POOLS,
    "cron": _CRON,
    "error": _ERROR,
}
