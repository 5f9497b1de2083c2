"""A small Hugging Face Hub for tests: the HTTP API that huggingface_hub 2.x uses, on 127.0.0.1, in memory.

Speaks: whoami (`/api/whoami-v2`), repo create (`/api/repos/create`), repo info with and without a revision
(`/api/models/<id>[/revision/<rev>]`), tree listing, refs, branch create, preupload (every file "regular", with the
remote git oid so unchanged files are skipped), commit (NDJSON: file / deletedFile / deletedFolder, content inline
base64; `create_pr=1` opens `refs/pr/N`), and resolve (HEAD and GET, with `X-Repo-Commit` and `ETag`).

Access rules follow the Hub's answers as huggingface_hub parses them:
  - a token the server does not know: 401, `X-Error-Message: Invalid credentials in Authorization header`;
  - a private repo read by anyone but its owner, or a repo that does not exist: 401 anonymous / 404 otherwise,
    `X-Error-Code: RepoNotFound`;
  - a revision that does not exist: 404 `RevisionNotFound`; a file that does not exist: 404 `EntryNotFound`;
  - writing without a token: 401; writing to another user's namespace: 403;
  - a README.md whose `base_model` is not a model id (a local path, say): 400, as the Hub rejects it.

LFS is not spoken: files are kept small enough to be committed inline (an adapter of a tiny model is a few KiB).
Every request is recorded in `requests` as (method, path) for tests that check what a client did or did not send.

    with HubServer(users={"alice": "tok-a"}) as hub:
        HfApi(endpoint=hub.url, token="tok-a").create_repo("alice/x")
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, bytes]
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)  # number -> head commit
    pr_titles: dict[int, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        m = re.fullmatch(r"refs/pr/(\d+)", revision)
        if m and int(m.group(1)) in self.prs:
            return self.commits[self.prs[int(m.group(1))]]
        return self.commits.get(revision)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class HubServer:
    """An in-memory Hub on 127.0.0.1:<free port>; `url` is what `HF_ENDPOINT` / `endpoint=` take."""

    def __init__(self, users: dict[str, str] | None = None):
        self.tokens = {tok: name for name, tok in (users or {}).items()}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._counter = 0
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- state helpers (also used by tests to look inside) ----------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        return dict(commit.files) if commit else {}

    def all_paths(self, repo_id: str) -> set[str]:
        """Every path in every commit of the repo (what ever left the client)."""
        return {p for c in self.repos[repo_id].commits.values() for p in c.files}

    def commit_messages(self, repo_id: str) -> list[str]:
        return [c.message for c in self.repos[repo_id].commits.values()]

    def new_commit(self, repo: Repo, parent: Commit | None, files: dict[str, bytes], message: str) -> Commit:
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}:{self._counter}:{message}".encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_sha(files[path]).encode())
        sha = digest.hexdigest()
        commit = Commit(sha, parent.sha if parent else None, files, message,
                        time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        repo.commits[sha] = commit
        return commit


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ---- plumbing ---------------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, e: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        body = json.dumps({"error": e.message, **e.extra}).encode()
        self._send(e.status, body, headers, head=head)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        token = auth[len("Bearer "):].strip()
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _readable(self, repo_id: str) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str) -> Repo:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        repo = self._readable(repo_id)
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _at(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        with self.hub.lock:
            self.hub.requests.append((method, self.path))
        body = self._body() if method == "POST" else b""
        try:
            with self.hub.lock:
                self._route(method, path, query, body)
        except HubError as e:
            self._error(e, head=method == "HEAD")

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    # ---- routes -----------------------------------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        repo_part = r"(?P<repo>[^/]+/[^/]+)"
        routes = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", rf"/api/models/{repo_part}/refs", self._refs),
            ("POST", rf"/api/models/{repo_part}/branch/(?P<branch>.+)", self._create_branch),
            ("POST", rf"/api/models/{repo_part}/discussions", self._open_pr),
            ("GET", rf"/api/models/{repo_part}/discussions/(?P<num>\d+)", self._pr_details),
            ("POST", rf"/api/models/{repo_part}/preupload/(?P<rev>.+)", self._preupload),
            ("POST", rf"/api/models/{repo_part}/commit/(?P<rev>.+)", self._commit),
            ("GET", rf"/api/models/{repo_part}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            ("GET", rf"/api/models/{repo_part}/revision/(?P<rev>.+)", self._info),
            ("GET", rf"/api/models/{repo_part}", self._info),
            ("GET", rf"/{repo_part}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("HEAD", rf"/{repo_part}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        for verb, pattern, fn in routes:
            m = re.fullmatch(pattern, path)
            if verb == method and m:
                groups = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                return fn(query=query, body=body, head=method == "HEAD", **groups)
        raise HubError(404, f"no route for {method} {path}")

    def _whoami(self, **_) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "id": user, "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def _create_repo(self, body: bytes, **_) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test Hub holds model repos only")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if not MODEL_ID.fullmatch(repo_id):
            raise HubError(400, f"invalid repo name {repo_id!r}")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        if repo_id in self.hub.repos:
            raise HubError(409, "You already created this model repo", extra={"url": f"{self.hub.url}/{repo_id}"})
        private = payload.get("private") or payload.get("visibility") == "private"
        repo = Repo(repo_id, user, bool(private))
        first = self.hub.new_commit(repo, None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs\n"},
                                    "initial commit")
        repo.branches["main"] = first.sha
        self.hub.repos[repo_id] = repo
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _refs(self, repo: str, **_) -> None:
        r = self._readable(repo)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in r.branches.items()]
        prs = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": sha} for n, sha in r.prs.items()]
        self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _create_branch(self, repo: str, branch: str, body: bytes, **_) -> None:
        r = self._writable(repo)
        branch = unquote(branch)
        if branch in r.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        r.branches[branch] = self._at(r, start).sha
        self._json(200, {})

    def _open_pr(self, repo: str, body: bytes, **_) -> None:
        r = self._writable(repo)
        payload = json.loads(body or b"{}")
        if not payload.get("pullRequest"):
            raise HubError(400, "this test Hub opens pull requests only, not discussions")
        number = max(r.prs, default=0) + 1
        r.prs[number] = r.branches["main"]
        r.pr_titles[number] = payload.get("title", "")
        self._json(200, {"num": number})

    def _pr_details(self, repo: str, num: str, **_) -> None:
        r = self._readable(repo)
        number = int(num)
        if number not in r.prs:
            raise HubError(404, f"discussion {number} not found")
        self._json(200, {"title": r.pr_titles.get(number, ""), "num": number, "author": {"name": r.owner},
                         "createdAt": r.commits[r.prs[number]].date, "status": "draft", "isPullRequest": True,
                         "repo": {"name": repo, "type": "model"}, "events": [], "filesWithConflicts": [],
                         "changes": {"base": "refs/heads/main"}, "diff": ""})

    def _preupload(self, repo: str, rev: str, body: bytes, query: dict, **_) -> None:
        r = self._writable(repo)
        files = self._at(r, rev).files if "create_pr" not in query else {}
        out = []
        for f in json.loads(body)["files"]:
            remote = files.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                        "oid": git_blob_sha(remote) if remote is not None else None})
        self._json(200, {"files": out, "commitOid": self._at(r, rev).sha})

    def _commit(self, repo: str, rev: str, body: bytes, query: dict, **_) -> None:
        r = self._writable(repo)
        parent = self._at(r, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        files = dict(parent.files)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            elif key == "lfsFile":
                raise HubError(400, "this test Hub does not speak LFS; keep files small")
        if "README.md" in files and (problem := self._card_problem(files["README.md"].decode(errors="replace"))):
            raise HubError(400, f"Invalid metadata in README.md.\n- {problem}")
        commit = self.hub.new_commit(r, parent, files, header.get("summary", ""))
        out = {"commitUrl": f"{self.hub.url}/{repo}/commit/{commit.sha}", "commitOid": commit.sha, "success": True}
        if query.get("create_pr") == ["1"]:
            number = max(r.prs, default=0) + 1
            r.prs[number] = commit.sha
            out["pullRequestUrl"] = f"{self.hub.url}/{repo}/discussions/{number}"
        else:
            target = unquote(rev)
            m = re.fullmatch(r"refs/pr/(\d+)", target)
            if m:
                r.prs[int(m.group(1))] = commit.sha
            elif target in r.branches:
                r.branches[target] = commit.sha
            else:
                raise HubError(400, f"cannot commit on {target}: not a branch")
        self._json(200, out)

    def _validate_yaml(self, body: bytes, **_) -> None:
        problem = self._card_problem(json.loads(body).get("content", ""))
        self._json(400 if problem else 200, {"errors": [{"message": problem}] if problem else [], "warnings": []})

    @staticmethod
    def _card_problem(text: str) -> str | None:
        """What the Hub would reject in a README's YAML front matter (here: a `base_model` that is no model id)."""
        m = re.match(r"---\n(.*?)\n---", text, re.S)
        for line in m.group(1).splitlines() if m else []:
            if line.startswith("base_model:"):
                value = line.split(":", 1)[1].strip().strip("'\"")
                if value and not MODEL_ID.fullmatch(value):
                    return f'"base_model" with value "{value}" is not valid. Use a model id from https://hf.co/models.'
        return None

    def _info(self, repo: str, rev: str = "main", **_) -> None:
        r = self._readable(repo)
        commit = self._at(r, rev)
        self._json(200, {
            "id": repo, "modelId": repo, "author": r.owner, "sha": commit.sha, "private": r.private,
            "lastModified": commit.date, "createdAt": commit.date, "disabled": False, "gated": False, "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _tree(self, repo: str, rev: str, sub: str | None = None, **_) -> None:
        r = self._readable(repo)
        commit = self._at(r, rev)
        prefix = (sub or "").strip("/")
        entries = [{"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": p}
                   for p, data in sorted(commit.files.items()) if not prefix or p.startswith(prefix + "/")]
        self._json(200, entries)

    def _resolve(self, repo: str, rev: str, file: str, head: bool, **_) -> None:
        r = self._readable(repo)
        commit = self._at(r, rev)
        if file not in commit.files:
            raise HubError(404, f"{file} does not exist at {rev}", "EntryNotFound")
        data = commit.files[file]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha(data)}"', "Accept-Ranges": "bytes"}
        self._send(200, data, headers, content_type="application/octet-stream", head=head)


if __name__ == "__main__":  # python tests/hub_server.py alice=tok-a  (serves until interrupted)
    import sys

    users = dict(arg.split("=", 1) for arg in sys.argv[1:])
    with HubServer(users) as hub:
        print(hub.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
