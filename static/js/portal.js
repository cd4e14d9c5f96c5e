// Copy buttons: <button data-copy="element-id">. Works on plain http (intranets) too, where
// navigator.clipboard is unavailable, by selecting the text and using execCommand.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.getElementById(button.dataset.copy);
  if (!source) return;
  const text = source.textContent;
  const label = button.textContent;
  try {
    if (!navigator.clipboard) throw new Error("no clipboard API");
    await navigator.clipboard.writeText(text);
  } catch {
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    document.execCommand("copy");
  }
  button.textContent = button.dataset.copied || "✓";
  setTimeout(() => { button.textContent = label; }, 1500);
});

// --- In-place actions on /my-keys (htmx) ------------------------------------------------------
// Focus goes where the person's next step is, Esc backs out of a confirm or rename row, and the
// live region (#key-status, aria-live) says what happened — or that it failed.

function focusOn(selector) {
  const target = selector && document.querySelector(selector);
  if (!target) return;
  if (target.tabIndex < 0 && !target.hasAttribute("tabindex")) target.setAttribute("tabindex", "-1");
  target.focus();
}

// A server answer asks for focus with `HX-Trigger-After-Settle: {"kp:focus": {"selector": …}}`.
document.addEventListener("kp:focus", (event) => focusOn(event.detail && event.detail.selector));

// A Cancel link names where focus returns (data-focus-after): its own row is swapped away.
// The wish rides on the request itself (its xhr), not in a shared variable: htmx settles a
// swap 20 ms after it, so Esc pressed as the confirm row appears starts the Cancel request
// before the row's own swap has settled, and that settle must not take the Cancel's wish
// (it would focus a Revoke button not yet back, and the Cancel's settle find nothing left).
document.addEventListener("htmx:beforeRequest", (event) => {
  const elt = event.detail.elt;
  const xhr = event.detail.xhr;
  if (xhr) xhr.kpFocusAfter = (elt && elt.dataset && elt.dataset.focusAfter) || null;
  const status = document.getElementById("key-status");
  if (status) status.textContent = "";
});
document.addEventListener("htmx:afterSettle", (event) => {
  const xhr = event.detail && event.detail.xhr;
  const selector = xhr && xhr.kpFocusAfter;
  if (!selector) return;
  xhr.kpFocusAfter = null;
  focusOn(selector);
});

function sayFailed() {
  const status = document.getElementById("key-status");
  if (status) status.textContent = status.dataset.failed || "";
}
document.addEventListener("htmx:responseError", sayFailed);
document.addEventListener("htmx:sendError", sayFailed);
document.addEventListener("htmx:timeout", sayFailed);

document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape" || !(event.target instanceof Element)) return;
  const row = event.target.closest("tr.confirm, tr.edit");
  const cancel = row && row.querySelector("[data-cancel]");
  if (!cancel) return;
  event.preventDefault();
  cancel.click();
});
