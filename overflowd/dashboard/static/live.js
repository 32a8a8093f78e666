// overflowd dashboard: the Reports page's live refresh (the only script; the tables work
// without it). Polls /dashboard/reports/rows for reports after the page's cursor, with the
// page's filters, and puts their rows at the top of the table, newest first.
"use strict";
(function () {
  const live = document.getElementById("live");
  const table = document.getElementById("reports");
  if (!live || !table) return;
  const state = document.getElementById("live-state");
  const body = table.tBodies[0];
  const limit = Number(live.dataset.limit) || 50;
  let next = live.dataset.next;
  let added = 0;
  let waitMs = 2000;
  async function poll() {
    try {
      const query = live.dataset.query ? live.dataset.query + "&" : "";
      const answer = await fetch("/dashboard/reports/rows?" + query + "after=" + next, {
        headers: { accept: "application/json" }, credentials: "same-origin",
      });
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      const page = await answer.json();
      if (page.count > 0) {
        body.insertAdjacentHTML("afterbegin", page.rows);
        added += page.count;
        while (body.rows.length > limit) body.deleteRow(body.rows.length - 1);
      }
      next = String(page.next);
      live.dataset.next = next;
      state.textContent = "live: " + added + " new since this page loaded";
      waitMs = page.count >= 100 ? 200 : 2000;
    } catch (err) {
      state.textContent = "live: paused (" + err.message + "), trying again";
      waitMs = 10000;
    }
    setTimeout(poll, waitMs);
  }
  setTimeout(poll, 1000);
})();
