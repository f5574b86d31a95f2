// cachalot's page works without this file. With it: the figures at a glance refresh from
// /ui/api/overview every 10 seconds, and each pull command gets a copy button.
"use strict";
(function () {
  function bytes(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"], u = 0;
    if (n < 1024) return n + " B";
    while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
    return n.toFixed(1) + " " + units[u];
  }
  function dur(s) {
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + (s % 60) + "s";
    return s + "s";
  }
  function pct(r) { return r === null || r === undefined ? "\u2014" : (r * 100).toFixed(1) + "%"; }
  function set(id, text) { var e = document.getElementById(id); if (e) e.textContent = text; }
  function refresh() {
    fetch("/ui/api/overview", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (o) {
        if (!o) return;
        ["manifest", "blob"].forEach(function (k) {
          var r = o.hit_ratio[k];
          set("hit-" + k + "-start", pct(r.since_start));
          set("hit-" + k + "-recent", pct(r.recent));
          set("hit-" + k + "-lookups", String(r.lookups));
        });
        set("bytes-cache", bytes(o.bytes.served_from_cache));
        set("bytes-fills", bytes(o.bytes.served_from_fills));
        set("bytes-fetched", bytes(o.bytes.fetched));
        set("bytes-saved", bytes(o.bytes.saved));
        set("cache-used", bytes(o.cache.bytes));
        set("cache-percent", pct(o.cache.bytes / Math.max(o.cache.max_size, 1)));
        set("cache-objects", String(o.cache.objects));
        set("fills-count", String(o.fills.length));
        set("recent-span", dur(Math.max(o.hit_ratio.recent_seconds, 1)));
        set("uptime", dur(o.uptime_seconds));
        var m = document.getElementById("cache-meter");
        if (m) m.value = o.cache.bytes;
        // For whoever checks that the figures are live (the browser test).
        document.body.setAttribute("data-refreshed", String(o.uptime_seconds));
      })
      .catch(function () {});
  }
  document.addEventListener("DOMContentLoaded", function () {
    if (document.getElementById("hit-blob-start")) setInterval(refresh, 10000);
    if (!navigator.clipboard) return;
    document.querySelectorAll("pre > code.cmd").forEach(function (code) {
      var b = document.createElement("button");
      b.type = "button";
      b.className = "copy";
      b.textContent = "Copy";
      b.setAttribute("aria-label", "Copy: " + code.textContent);
      b.addEventListener("click", function () {
        navigator.clipboard.writeText(code.textContent).then(function () {
          b.textContent = "Copied";
          setTimeout(function () { b.textContent = "Copy"; }, 1500);
        });
      });
      code.parentNode.insertBefore(b, code);
    });
  });
})();
