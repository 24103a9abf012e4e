// QNP error monitoring in the browser (issue 15): reports this page's uncaught errors
// to Sentry with the vendored SDK (vendor/sentry/bundle.min.js). Both scripts are on the
// page only as inert tags (_analytics.html; none under GPC or for a restricted account)
// and run only once analytics is granted (consent.js turns them into real scripts);
// this file still refuses under Global Privacy Control, stops the SDK
// (Sentry.close) as soon as analytics is withdrawn ("qnp:consent" without "analytics"),
// and sends no default PII, no replay, no tracing, no breadcrumbs, no sessions. Every
// event leaves without its request's query string, cookies and headers, without user,
// tags or extra, and without exception messages (they may quote what a person typed).
// The page's state is on <html data-qnp-monitoring>: on, closed, off or off-gpc.
"use strict";
(function () {
  var root = document.documentElement;
  var meta = document.querySelector('meta[name="qnp-sentry-dsn"]');
  var dsn = meta ? meta.getAttribute("content") : "";
  var active = false;

  function state(value) { root.setAttribute("data-qnp-monitoring", value); }
  function gpc() { return navigator.globalPrivacyControl === true; }
  function bare(url) { return typeof url === "string" ? url.split(/[?#]/)[0] : url; }

  function scrub(event) {
    if (!active) { return null; }  // withdrawn while this event was on its way
    if (event.request) { event.request = { url: bare(event.request.url) }; }
    delete event.user; delete event.extra; delete event.tags; delete event.breadcrumbs;
    delete event.message; delete event.logentry;
    var values = (event.exception && event.exception.values) || [];
    values.forEach(function (value) {
      delete value.value;
      var frames = (value.stacktrace && value.stacktrace.frames) || [];
      frames.forEach(function (frame) {
        delete frame.vars;
        frame.filename = bare(frame.filename);
        frame.abs_path = bare(frame.abs_path);
      });
    });
    return event;
  }

  function start() {
    if (active || !dsn || gpc()) { return; }
    window.Sentry.init({
      dsn: dsn,
      sendDefaultPii: false,
      defaultIntegrations: false,
      integrations: [window.Sentry.globalHandlersIntegration(),
                     window.Sentry.linkedErrorsIntegration(),
                     window.Sentry.dedupeIntegration()],
      sendClientReports: false,
      beforeSend: scrub,
      beforeBreadcrumb: function () { return null; },
    });
    active = true;
    state("on");
  }

  function stop() {
    if (!active) { return; }
    active = false;
    window.Sentry.close().then(function () { if (!active) { state("closed"); } });
  }

  function boot() {
    if (!dsn || !window.Sentry) { state("off"); return; }
    if (gpc()) { state("off-gpc"); return; }
    window.addEventListener("qnp:consent", function (event) {
      var granted = (event.detail && event.detail.granted) || [];
      if (granted.indexOf("analytics") >= 0) { start(); } else { stop(); }
    });
    start();
  }

  // The bundle may still be loading if the two scripts were inserted without order.
  var bundle = document.querySelector('script[src$="/static/vendor/sentry/bundle.min.js"]');
  if (!window.Sentry && bundle) { bundle.addEventListener("load", boot); } else { boot(); }
})();
