// QNP consent (issue 15). Every page works without this file: the banner's form posts
// and comes back. With it:
// - scripts of a category, <script type="text/plain" data-consent="P" data-src="...">,
//   run only once P is granted (analytics also needs no Global Privacy Control and an
//   account that is not restricted), each as a real script, in document order, one
//   after the other; a withdrawal stops any further activation;
// - every change dispatches window "qnp:consent" {detail: {granted: [...], gpc: bool}}
//   so a running script (Sentry) can close itself;
// - choices are sent with fetch and applied in place; "Cookie settings" opens the banner;
// - navigator.globalPrivacyControl is honoured like Sec-GPC and reported to the server
//   once for a signed-in account;
// - the theme toggle switches this page at once, and is remembered (by the server, in a
//   functional cookie) only with functional consent.
"use strict";
(function () {
  var state = document.getElementById("qnp-consent");
  if (!state) { return; }
  var banner = document.getElementById("consent-banner");

  function granted() {
    return (state.getAttribute("data-granted") || "").split(" ").filter(Boolean);
  }
  function gpc() {
    return state.getAttribute("data-gpc") === "1" || navigator.globalPrivacyControl === true;
  }
  function allowed(purpose) {
    if (granted().indexOf(purpose) < 0) { return false; }
    if (purpose === "analytics") {
      return state.getAttribute("data-analytics-allowed") === "1" && !gpc();
    }
    return true;
  }

  var running = false;
  var again = false;
  function activate() {
    if (running) { again = true; return; }
    running = true;
    var tags = document.querySelectorAll('script[type="text/plain"][data-consent]');
    var i = 0;
    function next() {
      while (i < tags.length) {
        var tag = tags[i++];
        // Checked as each one's turn comes: a withdrawal meanwhile stops the rest.
        if (tag.hasAttribute("data-activated") || !allowed(tag.getAttribute("data-consent"))) {
          continue;
        }
        tag.setAttribute("data-activated", "");
        var script = document.createElement("script");
        script.src = tag.getAttribute("data-src");
        script.async = false;
        script.onload = script.onerror = next;
        tag.parentNode.insertBefore(script, tag.nextSibling);
        return;
      }
      running = false;
      if (again) { again = false; activate(); }
    }
    next();
  }

  function announce() {
    window.dispatchEvent(new CustomEvent("qnp:consent",
      {detail: {granted: granted(), gpc: gpc()}}));
  }

  function showGpc() {
    document.querySelectorAll(".gpc-note").forEach(function (note) { note.hidden = false; });
    document.querySelectorAll('input[data-purpose="analytics"], input[data-purpose="marketing_email"]')
      .forEach(function (box) { box.checked = false; box.disabled = true; });
  }

  function apply(data) {
    state.setAttribute("data-granted", data.granted.join(" "));
    state.setAttribute("data-gpc", data.gpc ? "1" : "0");
    state.setAttribute("data-analytics-allowed", data.analytics_allowed ? "1" : "0");
    document.querySelectorAll("input[data-purpose]").forEach(function (box) {
      box.checked = data.granted.indexOf(box.getAttribute("data-purpose")) >= 0;
    });
    if (banner) { banner.hidden = data.show_banner === false; }
    if (gpc()) { showGpc(); }
    announce();
    activate();
  }

  function post(url, body) {
    return fetch(url, {method: "POST", body: body, credentials: "same-origin",
      headers: {"Accept": "application/json"}}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    });
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.hasAttribute("data-consent-form") || form.hasAttribute("data-plain")) { return; }
    event.preventDefault();
    var submitter = event.submitter;
    var body = new URLSearchParams(new FormData(form, submitter));
    if (gpc()) { body.set("gpc", "1"); }  // the page's own signal, as Sec-GPC would
    post(form.action, body)
      .then(function (doc) { apply(doc.data); })
      .catch(function () {  // post it the plain way instead
        form.setAttribute("data-plain", "");
        form.requestSubmit(submitter);
      });
  });

  document.addEventListener("click", function (event) {
    var open = event.target.closest("a[data-consent-open]");
    if (!open || !banner) { return; }
    event.preventDefault();
    banner.hidden = false;
    banner.scrollIntoView();
    var first = banner.querySelector("input, button");
    if (first) { first.focus(); }
  });

  // The theme: this page at once; remembered only if the server may store it.
  var toggle = document.querySelector("button[data-theme-toggle]");
  function effectiveTheme() {
    var chosen = document.documentElement.getAttribute("data-theme");
    if (chosen) { return chosen; }
    return window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }
  function labelToggle() {
    var other = effectiveTheme() === "dark" ? "light" : "dark";
    toggle.value = other;
    toggle.textContent = other === "dark" ? "Dark theme" : "Light theme";
  }
  if (toggle) {
    labelToggle();
    toggle.form.addEventListener("submit", function (event) {
      event.preventDefault();
      var theme = toggle.value;
      document.documentElement.setAttribute("data-theme", theme);
      labelToggle();
      if (!allowed("functional")) { return; }  // store nothing
      var body = new URLSearchParams(new FormData(toggle.form));
      body.set("theme", theme);
      post(toggle.form.action, body).catch(function () { /* this page keeps its theme */ });
    });
  }

  if (gpc()) { showGpc(); }
  if (navigator.globalPrivacyControl === true && state.getAttribute("data-gpc-record") === "1") {
    var report = new URLSearchParams();
    report.set("csrf_token", state.getAttribute("data-csrf"));
    report.set("gpc", "1");
    state.setAttribute("data-gpc-record", "0");
    post("/consent", report).then(function (doc) { apply(doc.data); }).catch(function () {});
  }
  activate();
}());
