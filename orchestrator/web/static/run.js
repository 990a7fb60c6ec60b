// The run page follows its run: the server's event stream (Server-Sent Events) says when something
// happened, and the run's fragment (status, steps, events, report links) is fetched again, one
// fetch at a time (events arriving meanwhile ask for one more).
(function () {
  const run = document.getElementById("run");
  if (!run || !run.dataset.events) return;
  const fragment = run.dataset.fragment;
  let busy = false;
  let again = false;
  const refresh = () => {
    if (busy) { again = true; return; }
    busy = true;
    fetch(fragment, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text() : Promise.reject(r.status)))
      .then((html) => { document.getElementById("run").outerHTML = html; })
      .catch(() => {})
      .finally(() => { busy = false; if (again) { again = false; refresh(); } });
  };
  const source = new EventSource(run.dataset.events);
  source.addEventListener("progress", refresh);
  source.addEventListener("done", () => { source.close(); refresh(); });
})();
