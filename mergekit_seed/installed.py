"""Where this installation came from: package versions and the pip line that installs it again,
without credentials or local paths (what a model card records)."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import PackageNotFoundError, distribution, version
from urllib.parse import urlsplit, urlunsplit


def public_url(url: str) -> str:
    """``url`` without what must never be published: credentials (``user:token@``; a token
    may stand alone where the user name goes), the query string and the fragment
    (``https://u:t@host/x.git?tok=1`` -> ``https://host/x.git``). An ssh remote keeps its user
    name (``git``), which is no secret and which ssh needs; an scp-like remote
    (``git@host:org/x``) is written as the ``ssh://`` URL pip reads."""
    if "://" not in url and ":" in url:  # scp-like syntax: [user@]host:path
        host, _, path = url.partition(":")
        url = f"ssh://{host}/{path.lstrip('/')}"
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.scheme.endswith("ssh") and parts.username and parts.password is None:
        netloc = f"{parts.username}@{netloc}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def install_command() -> str:
    """The pip requirement that installs this mergekit-seed again, from where it came (PEP 610
    ``direct_url.json``): a VCS URL at its commit, a local folder's git remote at its commit,
    else the index version."""
    try:
        direct = json.loads(distribution("mergekit-seed").read_text("direct_url.json") or "null")
    except (PackageNotFoundError, ValueError):
        direct = None
    pinned = f'"mergekit-seed=={package_version("mergekit-seed")}"'
    if not direct:
        return pinned
    url = direct.get("url", "")
    vcs = direct.get("vcs_info")
    if vcs:
        return f'"mergekit-seed @ {vcs.get("vcs", "git")}+{public_url(url)}@{vcs.get("commit_id", "")}"'
    if url.startswith("file://"):
        folder = url[len("file://"):]
        try:
            def git(*args: str) -> str:
                return subprocess.run(
                    ["git", "-C", folder, *args], capture_output=True, text=True, check=True, timeout=5
                ).stdout.strip()

            remote, commit = git("remote", "get-url", "origin"), git("rev-parse", "HEAD")
            if remote and commit and not remote.startswith(("/", ".", "file:")):
                return f'"mergekit-seed @ git+{public_url(remote)}@{commit}"'
        except (OSError, subprocess.SubprocessError):
            pass
        return f"{pinned}  # installed from a local folder: install that source instead"
    return pinned


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
