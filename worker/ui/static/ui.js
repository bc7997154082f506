// The UI's only script: confirmation before destructive actions, and a refresh of pages
// that show a delivery still pending (so a replay's new attempt appears by itself).
"use strict";
document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form instanceof HTMLFormElement ? form.dataset.confirm : undefined;
  if (question && !window.confirm(question)) event.preventDefault();
});
(() => {
  const seconds = Number(document.body.dataset.refresh || 0);
  if (seconds > 0) {
    window.setTimeout(() => window.location.replace(window.location.pathname), seconds * 1000);
  }
})();
