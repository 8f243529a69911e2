"""Where this installation came from: package versions and the pip line that installs it again,
without credentials or local paths (what a model card records)."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import PackageNotFoundError, distribution, version

from mergekit_seed.public import public_url


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
    if vcs and not url.startswith("file:"):
        return f'"mergekit-seed @ {vcs.get("vcs", "git")}+{public_url(url)}@{vcs.get("commit_id", "")}"'
    if url.startswith("file://"):
        folder = url[len("file://") :]
        try:

            def git(*args: str) -> str:
                return subprocess.run(
                    ["git", "-C", folder, *args], capture_output=True, text=True, check=True, timeout=5
                ).stdout.strip()

            remote, commit = git("remote", "get-url", "origin"), git("rev-parse", "HEAD")
            if remote and commit and _is_remote(remote):
                return f'"mergekit-seed @ git+{public_url(remote)}@{commit}"'
        except (OSError, subprocess.SubprocessError):
            pass
        return f"{pinned}  # installed from a local folder: install that source instead"
    return pinned


def _is_remote(remote: str) -> bool:
    """A git remote another machine can reach: a URL with a network scheme, or scp-like
    ``host:path``; never a path on this machine (``/src/x``, ``~/src/x``, ``../x``, ``file://``)."""
    if "://" in remote:
        return remote.split("://", 1)[0].lower() in ("https", "http", "ssh", "git", "git+ssh", "git+https")
    host, separator, _ = remote.partition(":")
    return bool(separator) and bool(host) and not host.startswith(("/", ".", "~")) and "/" not in host


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
