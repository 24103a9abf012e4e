// QNP dashboard: progressive enhancement only. Every page works without this file;
// with it, "Copy" buttons copy a value or an element's text to the clipboard.
"use strict";
document.addEventListener("click", function (event) {
  var button = event.target.closest("button.copy");
  if (!button) { return; }
  var from = button.getAttribute("data-copy-from");
  var text = from ? document.getElementById(from).textContent : button.getAttribute("data-copy");
  navigator.clipboard.writeText(text).then(function () {
    var label = button.textContent;
    button.textContent = "Copied";
    window.setTimeout(function () { button.textContent = label; }, 1500);
  });
});
