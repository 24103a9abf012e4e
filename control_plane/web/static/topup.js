// QNP credits page: a top-up with Stripe's own card form (Stripe.js Elements). The card
// goes from this page to Stripe and never to us. One click: create the PaymentIntent
// through our API (its request id made once per attempt, so a retry of the same click
// finds the same PaymentIntent), confirm it with Stripe.js, then our return path
// credits it (a lost webhook loses nothing) and the page shows the new balance.
// Saving a card for auto top-up works the same way with a SetupIntent, in a card form
// of its own: our API makes it, Stripe.js confirms it with the card, our API keeps the
// card Stripe saved, and the page shows it and lets auto top-up be turned on.
"use strict";
(function () {
  var form = document.getElementById("topup-form");
  if (!form) { return; }
  var amount = document.getElementById("topup-amount");
  var quote = document.getElementById("topup-quote");
  var status = document.getElementById("topup-status");
  var pay = document.getElementById("topup-pay");
  var minCents = Number(form.getAttribute("data-min-cents"));
  var maxCents = Number(form.getAttribute("data-max-cents"));
  var csrf = form.getAttribute("data-csrf-token");
  var attempt = null; // {requestId, cents}: kept until it is paid or the amount changes

  function say(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  if (typeof window.Stripe !== "function") {
    pay.disabled = true;
    say("The card form could not be loaded; reload the page to try again.", true);
    return;
  }
  var stripe = window.Stripe(form.getAttribute("data-publishable-key"));
  var card = stripe.elements().create("card");
  card.mount("#card-element");

  function dollars(cents) {
    return "$" + (cents / 100).toLocaleString("en-US", {minimumFractionDigits: 2,
                                                        maximumFractionDigits: 2});
  }

  function centsOf(text) {
    var m = /^\s*\$?\s*(\d{1,9})(?:\.(\d{1,2}))?\s*$/.exec(text);
    if (!m) { return null; }
    return Number(m[1]) * 100 + Number(((m[2] || "") + "00").slice(0, 2));
  }

  function uuid4() {
    var b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function api(method, path, body) {
    var options = {method: method, credentials: "same-origin",
                   headers: {"Accept": "application/json", "X-CSRF-Token": csrf}};
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(path, options).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (doc) {
        if (!r.ok) {
          var message = doc.error && doc.error.message;
          throw new Error(message || "Something went wrong (" + r.status + "); nothing was charged.");
        }
        return doc.data;
      });
    });
  }

  var quoting = 0;
  function requote() {
    var cents = centsOf(amount.value);
    if (cents === null || cents < minCents || cents > maxCents) {
      quote.textContent = "Choose an amount from " + dollars(minCents) + " to " + dollars(maxCents) + ".";
      return;
    }
    var mine = ++quoting;
    api("GET", "/api/v1/credits/topup/quote?amount_cents=" + cents).then(function (q) {
      if (mine !== quoting) { return; }
      quote.textContent = "You pay " + dollars(q.amount_cents) + ": " + dollars(q.credit_cents) +
        " of credit plus a " + dollars(q.fee_cents) + " fee.";
    }, function (e) { if (mine === quoting) { quote.textContent = e.message; } });
  }
  amount.addEventListener("input", requote);

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var cents = centsOf(amount.value);
    if (cents === null || cents < minCents || cents > maxCents) {
      say("Choose an amount from " + dollars(minCents) + " to " + dollars(maxCents) + ".", true);
      return;
    }
    var notice = document.querySelector("[data-testid=topup-paid]");
    if (notice) { notice.remove(); } // the last payment's, not this one's
    if (attempt === null || attempt.cents !== cents) {
      attempt = {requestId: uuid4(), cents: cents};
    }
    pay.disabled = true;
    say("Paying…", false);
    var intentId = null;
    api("POST", "/api/v1/credits/topup", {amount_cents: cents, request_id: attempt.requestId})
      .then(function (started) {
        intentId = started.payment_intent_id;
        return stripe.confirmCardPayment(started.client_secret, {payment_method: {card: card}});
      })
      .then(function (result) {
        // Either way our return path asks Stripe how it went (and records a decline).
        return api("POST", "/api/v1/credits/topup/complete", {payment_intent_id: intentId})
          .then(function (done) {
            if (result.error) { throw new Error(result.error.message || "The payment failed."); }
            if (done.status !== "succeeded") {
              throw new Error(done.failure || "The payment is not complete (" + done.status + ").");
            }
            attempt = null;
            window.location.assign("/credits?paid=" + encodeURIComponent(intentId) + "#topup");
          }, function (e) {
            throw result.error ? new Error(result.error.message || "The payment failed.") : e;
          });
      })
      .catch(function (e) {
        say(e.message, true);
        pay.disabled = false;
      });
  });

  // --- saving a card for auto top-up (a SetupIntent; issue 13) ---
  var saveCard = document.querySelector("[data-testid=auto-topup-save-card]");
  var setup = document.getElementById("card-setup");
  if (!saveCard || !setup) { return; }
  var saveThis = document.getElementById("card-setup-save");
  var setupStatus = document.getElementById("card-setup-status");
  var setupCard = null; // mounted on the first "Save a card"
  var setupAttempt = null; // the request id, kept until Stripe has answered for it

  function sayOnSetup(text, isError) {
    setupStatus.textContent = text;
    setupStatus.className = isError ? "error" : "";
  }

  function showCard(saved) {
    var brand = saved.brand || "card";
    document.querySelector("[data-testid=auto-topup-card]").textContent =
      brand.charAt(0).toUpperCase() + brand.slice(1) + " \u2022\u2022\u2022\u2022 " + saved.last4;
    var enabled = document.querySelector("[data-testid=auto-topup] input[name=enabled]");
    if (enabled) { enabled.disabled = false; }
    var hint = document.querySelector("[data-card-hint]");
    if (hint) { hint.remove(); }
    setup.hidden = true;
    saveCard.textContent = "Use another card";
    saveCard.setAttribute("aria-expanded", "false");
  }

  saveCard.hidden = false;
  saveCard.addEventListener("click", function () {
    if (setupCard === null) {
      setupCard = stripe.elements().create("card");
      setupCard.mount("#card-setup-element");
    }
    setup.hidden = false;
    saveCard.setAttribute("aria-expanded", "true");
    sayOnSetup("", false);
  });

  saveThis.addEventListener("click", function () {
    if (setupAttempt === null) { setupAttempt = uuid4(); }
    saveThis.disabled = true;
    sayOnSetup("Saving the card…", false);
    api("POST", "/api/v1/credits/auto-topup/card", {request_id: setupAttempt})
      .then(function (started) {
        setupAttempt = null; // Stripe answers for this one now: the next click is new
        return stripe.confirmCardSetup(started.client_secret, {payment_method: {card: setupCard}})
          .then(function (result) {
            if (result.error) {
              throw new Error(result.error.message || "The card could not be saved.");
            }
            return api("POST", "/api/v1/credits/auto-topup/card/complete",
                       {setup_intent_id: started.setup_intent_id});
          });
      })
      .then(function (config) {
        showCard(config.card);
        sayOnSetup("", false);
        saveThis.disabled = false;
        saveCard.focus();
      })
      .catch(function (e) {
        sayOnSetup(e.message, true);
        saveThis.disabled = false;
      });
  });
})();
