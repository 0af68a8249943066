// The sign-in page of `rlhf label`: POST api/login sets the HttpOnly session cookie that both the
// Gradio UI (at /) and the JSON API accept; then go to the UI. The server sends a strict CSP here.
"use strict";

const $ = (id) => document.getElementById(id);

async function signIn(event) {
  event.preventDefault();
  const button = $("login-submit");
  button.disabled = true;
  $("login-error").textContent = "";
  try {
    const response = await fetch("api/login", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ username: $("login-username").value.trim(), password: $("login-password").value }),
    });
    if (response.ok) {
      window.location.replace("./");
      return;
    }
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error || message; } catch (err) { /* keep the status */ }
    $("login-error").textContent = message;
  } catch (err) {
    $("login-error").textContent = "Cannot reach the server; try again.";
  }
  button.disabled = false;
}

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", signIn);
  const params = new URLSearchParams(window.location.search);
  if (params.get("signed_out")) $("login-error").textContent = "Signed out.";
  // Already signed in (e.g. the link was opened from another site, which does not send our
  // SameSite=Strict cookie on that first request): go straight to the app.
  try {
    const response = await fetch("api/session", { credentials: "same-origin" });
    if (response.ok) { window.location.replace("./"); return; }
  } catch (err) { /* show the form */ }
  $("login-username").focus();
});
