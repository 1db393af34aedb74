"""Drive a JupyterHub as a user would, from inside the hub's network namespace.

Run as ``python -m tests.harness.e2e_driver HUB_URL TOKEN USER``; prints one JSON object with
what happened. The netns test runs it with ``ip netns exec`` because nothing may talk to
a namespace address from the root namespace.
"""

from __future__ import annotations

import json
import re
import sys
import time

import requests


def read_progress(url: str, headers: dict, timeout: float, into: list | None = None) -> list[dict]:
    """A JupyterHub progress event stream (server-sent events), until ready or failed.

    Each event is appended to ``into`` as it arrives (for a caller watching from another
    thread), and the list is returned."""
    events = [] if into is None else into
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                event = json.loads(line[5:])
                events.append(event)
                if event.get("ready") or event.get("failed"):
                    break
    return events


def hub_login(browser: requests.Session, hub_url: str, user: str, follow: bool = True) -> requests.Response:
    """Log in on the hub's login form as a browser does (its _xsrf field; any password:
    the tests' hubs use a dummy authenticator); the answer, redirects followed or not."""
    page = browser.get(f"{hub_url}/hub/login", timeout=30).text
    xsrf = re.search(r'name="_xsrf"\s+value="([^"]+)"', page)
    return browser.post(
        f"{hub_url}/hub/login",
        data={"username": user, "password": "any", "_xsrf": xsrf.group(1) if xsrf else ""},
        allow_redirects=follow,
        timeout=30,
    )


def browser_oauth(hub_url: str, user: str) -> dict:
    """Log in like a browser, then open pages of the user's running notebook: the
    notebook's OAuth (redirect to the hub, back to its oauth_callback, the code exchanged
    with the hub API). The redirects taken, whether the notebook's cookie was set, and
    the status of an API page with that cookie alone (no token)."""
    browser = requests.Session()
    # after login the hub sends the browser to its running server
    r = hub_login(browser, hub_url, user)
    history = [h.url for h in r.history]
    # a page of the notebook that needs a login whatever extensions it has (without
    # JupyterLab its root page may not): the notebook sends the browser through OAuth
    r = browser.get(f"{hub_url}/user/{user}/files/outpost-oauth-check.txt", timeout=30)
    history += [h.url for h in r.history]
    contents = browser.get(f"{hub_url}/user/{user}/api/contents", timeout=30)
    return {
        "path": [url.split(hub_url, 1)[-1].split("?")[0] for url in history],
        "cookie": f"jupyterhub-user-{user}" in browser.cookies.keys(),
        "status": contents.status_code,
    }


def main(hub_url: str, token: str, user: str) -> dict:
    auth = {"Authorization": f"token {token}"}
    api = f"{hub_url}/hub/api"
    out: dict = {}
    r = requests.post(f"{api}/users/{user}", headers=auth, timeout=30)
    out["create_user"] = r.status_code
    r = requests.post(f"{api}/users/{user}/server", headers=auth, json={}, timeout=30)
    out["start"] = r.status_code
    out["events"] = read_progress(f"{api}/users/{user}/server/progress", auth, timeout=120)

    # 1. a token request through the proxy: the notebook checks the token with the hub API
    r = requests.get(f"{hub_url}/user/{user}/api/status", headers=auth, timeout=30)
    out["status_with_token"] = r.status_code

    # 2. a browser: log in, then OAuth to the notebook (it exchanges the code with the hub)
    oauth = browser_oauth(hub_url, user)
    out["oauth_path"], out["oauth_cookie"], out["oauth_status"] = oauth["path"], oauth["cookie"], oauth["status"]

    # 3. activity: the notebook reports it to the hub's activity URL
    def last_activity():
        model = requests.get(f"{api}/users/{user}", headers=auth, timeout=30).json()
        return model["servers"][""]["last_activity"]

    out["activity_before"] = last_activity()
    time.sleep(1.5)
    requests.get(f"{hub_url}/user/{user}/api/contents", headers=auth, timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and last_activity() == out["activity_before"]:
        time.sleep(0.5)
    out["activity_after"] = last_activity()

    r = requests.delete(f"{api}/users/{user}/server", headers=auth, timeout=30)
    out["stop"] = r.status_code
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        model = requests.get(f"{api}/users/{user}", headers=auth, timeout=30).json()
        if not model["servers"]:
            break
        time.sleep(0.3)
    out["stopped"] = not model["servers"]
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
