"""`launch.py submit`: fails fast and clearly on a dead address, never shows the token, uploads no secret.

The command runs in a fresh interpreter (`_submit`) because Ray reads RAY_AUTH_MODE once per process;
the probe's pure parts run in-process. Real jobs on a real token cluster (one that succeeds across two
nodes, one that fails, a --no-wait submission) are in tests/test_multinode.py, which starts that cluster.
"""

from __future__ import annotations

import http.server
import io
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from local_services import (
    clean_env,
    free_port,
)

from eir.submit import (
    SECRET_EXCLUDES,
    SubmitError,
    UploadScan,
    build_entrypoint,
    build_runtime_env,
    check_dashboard,
    mask,
    normalize_address,
    scan_upload,
    secrets_of,
    strip_separator,
    upload_excludes,
)

REPO = Path(__file__).resolve().parents[1]
SENTINEL = "eir-sentinel-token-5f1c9a2e"
# launch.py's parser, reduced to `submit` (so these tests don't depend on launch.py's wiring).
RUNNER = textwrap.dedent(
    """\
    import argparse, sys
    from eir.submit import add_submit_parser
    parser = argparse.ArgumentParser(prog="launch.py")
    add_submit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(sys.argv[1:])
    sys.exit(args.func(args))
    """
)


def _submit(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, "submit", *args],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- pure parts


def test_entrypoint_quotes_each_argument_after_the_separator() -> None:
    args = strip_separator(["--", "run", "experiments/quickstart.yaml", "run.name=a b", "--resume"])
    assert build_entrypoint(args) == "python launch.py run experiments/quickstart.yaml 'run.name=a b' --resume"
    with pytest.raises(SubmitError, match="no command to submit"):
        build_entrypoint(strip_separator(["--"]))


def test_runtime_env_uploads_the_repo_and_passes_only_the_tracking_uri(tmp_path: Path) -> None:
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_SECRET_ACCESS_KEY": "x", "RAY_AUTH_TOKEN": "y"}
    env = build_runtime_env(REPO, environ)
    assert env == {
        "working_dir": str(REPO),
        "excludes": upload_excludes(REPO),
        "env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
    }
    assert env["excludes"][-len(SECRET_EXCLUDES) :] == SECRET_EXCLUDES, (
        "the secrets come last: no .gitignore line undoes them"
    )
    assert "env_vars" not in build_runtime_env(REPO, {})
    with pytest.raises(SubmitError, match="password"):
        build_runtime_env(REPO, {"MLFLOW_TRACKING_URI": "https://me:hunter2@mlflow.example.com"})
    with pytest.raises(SubmitError, match=f"{tmp_path} has no launch.py"):
        build_runtime_env(tmp_path, {})


def test_the_upload_leaves_out_local_results_data_and_environments(tmp_path: Path) -> None:
    """What Ray's own packager would upload with EXCLUDES (and no .gitignore): the code, with its
    `eir/data` and `tests/data` packages, but no environment, results, prepared data, report or MLflow store."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    kept = [
        "launch.py",
        "pyproject.toml",
        "eir/data/ingest.py",
        "tests/data/test_ingest.py",
        "eir/report.py",
        "experiments/quickstart.yaml",
    ]
    dropped = [
        ".venv/bin/python",
        "outputs/run/results.json",
        "data/camvid/train/part-0.parquet",
        "report/report.md",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/model.pt",
        "mlflow.db",
        "outputs.db",
        ".git/HEAD",
        "eir.egg-info/PKG-INFO",
        "eir/__pycache__/x.pyc",
        ".pytest_cache/v",
    ]
    for name in kept + dropped:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    uploaded: list[str] = []
    _dir_travel(
        tmp_path,
        [_get_excludes(tmp_path, build_runtime_env(REPO, {})["excludes"])],
        lambda p: p.is_file() and uploaded.append(p.relative_to(tmp_path).as_posix()),
        include_gitignore=False,
    )
    assert sorted(uploaded) == sorted(kept)


# A working dir holding every kind of secret the upload must leave out, at the root and deeper down,
# beside the code it must keep (including code whose names merely sound secret).
SECRET_FILES = [
    ".env",
    ".env.production",
    ".envrc",
    "sub/.env",
    ".aws/credentials",
    ".aws/config",
    ".ssh/id_rsa",
    "deploy/id_rsa",
    "deploy/id_rsa.pub",
    "id_ed25519",
    "keys/id_ecdsa",
    ".netrc",
    "certs/server.pem",
    "certs/server.key",
    "certs/client.p12",
    ".ray/auth_token",
    "secrets/db_password.txt",
    "infra/terraform.tfstate",
    "infra/terraform.tfstate.backup",
    ".git-credentials",
    ".docker/config.json",
    "home/.docker/config.json",
    "credentials.json",
    "eir/credentials.json",
    ".kube/config",
    ".gcloud/credentials.db",
    "home/.config/gcloud/application_default_credentials.json",
    "application_default_credentials.json",
]
# How the scan names them: a matching folder once, with a slash (it is never entered), files by path.
SECRETS_SHOWN = sorted(
    [
        ".env",
        ".env.production",
        ".envrc",
        "sub/.env",
        ".aws/",
        ".ssh/",
        "deploy/id_rsa",
        "deploy/id_rsa.pub",
        "id_ed25519",
        "keys/id_ecdsa",
        ".netrc",
        "certs/server.pem",
        "certs/server.key",
        "certs/client.p12",
        ".ray/",
        "secrets/",
        "infra/terraform.tfstate",
        "infra/terraform.tfstate.backup",
        ".git-credentials",
        ".docker/config.json",
        "home/.docker/config.json",
        "credentials.json",
        "eir/credentials.json",
        ".kube/",
        ".gcloud/",
        "home/.config/gcloud/",
        "application_default_credentials.json",
    ]
)
KEPT_FILES = [
    "launch.py",
    "pyproject.toml",
    "README.md",
    ".gitignore",
    "eir/__init__.py",
    "eir/submit.py",
    "eir/data/ingest.py",
    "eir/train/experiment.py",
    "eir/env.py",
    "eir/keys.py",
    "experiments/quickstart.yaml",
    "tests/test_submit.py",
    "tests/data/test_ingest.py",
    "cluster/aws.yaml",
]
# Left out by the .gitignore (whose negations try, and fail, to bring secrets back) and by EXCLUDES.
OTHER_FILES = ["local_notes/todo.md", "train.log", ".venv/lib/certifi/cacert.pem", "outputs/run/results.json"]
SECRET_TEXT = "eir-secret-content-7d41"


def _working_dir(root: Path) -> Path:
    for name in SECRET_FILES + KEPT_FILES + OTHER_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(SECRET_TEXT if name in SECRET_FILES else "x")
    (root / ".gitignore").write_text("# local\nlocal_notes/\n*.log\n!.env\n!secrets/\n!*.pem\n")
    return root


def _uploaded_by_ray(working_dir: Path, include_gitignore: bool) -> list[str]:
    """The files Ray's own packager walk keeps with the excludes `submit` gives it."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    kept: list[str] = []
    excludes = build_runtime_env(working_dir, {})["excludes"]
    _dir_travel(
        working_dir,
        [_get_excludes(working_dir, excludes)],
        lambda p: p.is_file() and kept.append(p.relative_to(working_dir).as_posix()),
        include_gitignore=include_gitignore,
    )
    return sorted(kept)


def test_secrets_are_never_uploaded_and_the_code_always_is(tmp_path: Path) -> None:
    """With Ray's own matcher: every secret left out by the excludes alone (as with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1,
    when Ray does not read the .gitignore) and with Ray's .gitignore reading; launch.py and eir/** kept."""
    working_dir = _working_dir(tmp_path)
    assert _uploaded_by_ray(working_dir, include_gitignore=False) == sorted(KEPT_FILES)
    assert _uploaded_by_ray(working_dir, include_gitignore=True) == sorted(KEPT_FILES)


def test_the_scan_names_each_secret_and_counts_the_rest(tmp_path: Path) -> None:
    working_dir = _working_dir(tmp_path)
    scan = scan_upload(working_dir, upload_excludes(working_dir))
    assert scan == UploadScan(tuple(SECRETS_SHOWN), others=4)  # local_notes/, train.log, .venv, outputs
    lines = scan.summary()
    assert lines[0] == (
        f"upload: left out {len(SECRETS_SHOWN)} path(s) that look like secrets (never uploaded): "
        + ", ".join(SECRETS_SHOWN)
    )
    assert lines[1].startswith("upload: left out 4 other path(s)")
    assert SECRET_TEXT not in "\n".join(lines)
    clean = working_dir / "experiments"
    assert scan_upload(clean, upload_excludes(clean)).summary() == [
        "upload: left out 0 other path(s) (environments, results, data, MLflow stores, caches, .gitignore patterns)"
    ]


def test_the_scan_ends_on_a_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "launch.py").write_text("x")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "a" / ".env").write_text(SECRET_TEXT)
    assert scan_upload(tmp_path, upload_excludes(tmp_path)).secrets == ("a/.env",)


def test_every_file_the_repository_tracks_is_uploaded() -> None:
    """The deny-list is about secrets, never code: nothing git tracks here matches it (or anything else left out)."""
    from ray._private.runtime_env.packaging import _get_excludes

    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    excluded = _get_excludes(REPO, build_runtime_env(REPO, {})["excludes"])

    def left_out(relative: PurePosixPath) -> bool:
        """Ray prunes an excluded folder: a file is left out when it or a folder above it matches."""
        return any(excluded(REPO / path) for path in [relative, *list(relative.parents)[:-1]])

    tracked = [PurePosixPath(name) for name in listed.stdout.splitlines()]
    assert len(tracked) > 100 and [p for p in tracked if left_out(p)] == []


def test_an_unreadable_gitignore_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "launch.py").write_text("x")
    (tmp_path / ".gitignore").write_bytes(b"\xff\xfe.env\n")
    with pytest.raises(SubmitError, match=rf"cannot read {tmp_path / '.gitignore'} .*fix or remove it"):
        build_runtime_env(tmp_path, {})


def test_address_must_be_a_dashboard_url() -> None:
    assert normalize_address("http://head:8265/") == "http://head:8265"
    with pytest.raises(SubmitError, match="not the GCS address"):
        normalize_address("head:6379")


def test_every_form_of_the_token_is_masked() -> None:
    secrets = secrets_of({"authorization": f"Bearer {SENTINEL}"}, {"RAY_AUTH_TOKEN": "other-token"})
    text = f"header Bearer {SENTINEL}, bare {SENTINEL}, env other-token"
    assert mask(text, secrets) == "header ***, bare ***, env ***"


# ---------------------------------------------------------------- the probe


@pytest.fixture
def fake_dashboard() -> Iterator[tuple[str, list[dict[str, str]], list[int]]]:
    """A local HTTP server answering every GET with the status in `status[0]` (200: a Ray 2.60.0 version
    document) and every POST with 500 whose body echoes the request's authorization header (as a careless
    proxy might: what `submit` prints of it must be masked); records each request's method, path and headers."""
    seen: list[dict[str, str]] = []
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, code: int) -> None:
            seen.append({"method": self.command, "path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            error = {"error": "no", "authorization": self.headers.get("authorization", "")}
            body = json.dumps({"ray_version": "2.60.0"} if code == 200 else error).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(status[0])

        def do_POST(self) -> None:
            self._answer(500)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen, status
    server.shutdown()
    server.server_close()


def test_probe_reads_the_version_and_explains_401_and_403(fake_dashboard) -> None:
    address, seen, status = fake_dashboard
    assert check_dashboard(address, {}, 5, {}) == "2.60.0"
    status[0] = 401
    with pytest.raises(
        SubmitError, match="answered 401.*set RAY_AUTH_MODE=token.*no token is sent unless RAY_AUTH_MODE=token"
    ):
        check_dashboard(address, {}, 5, {"RAY_AUTH_TOKEN": SENTINEL})
    status[0] = 403
    with pytest.raises(SubmitError, match="answered 403.*the token sent was rejected") as info:
        check_dashboard(address, {"authorization": f"Bearer {SENTINEL}"}, 5, {})
    assert SENTINEL not in str(info.value)
    assert seen[-1]["authorization"] == f"Bearer {SENTINEL}"
    status[0] = 404
    with pytest.raises(SubmitError, match="not a working Ray dashboard"):
        check_dashboard(address, {}, 5, {})


def test_probe_gives_up_on_a_server_that_never_answers() -> None:
    """A port that accepts connections but never replies: the SDK would wait forever, the probe 1 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(
            SubmitError, match=r"no Ray dashboard answered at .* \(tried GET /api/version, timed out after 1s\)"
        ):
            check_dashboard(address, {}, 1, {})
        assert time.monotonic() - start < 5


def test_dead_address_fails_fast_with_exit_2_and_never_shows_the_token() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=SENTINEL)
    start = time.monotonic()
    result = _submit(["--address", address, "--", "run", "experiments/quickstart.yaml"], env, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    assert elapsed < 15
    assert f"no Ray dashboard answered at {address} (tried GET /api/version, connection refused)" in result.stderr
    assert SENTINEL not in result.stdout + result.stderr


def test_token_mode_sends_rays_own_header_and_hides_the_token(fake_dashboard) -> None:
    """With RAY_AUTH_MODE=token the probe sends the header Ray's SDK sends; a rejection never shows the token."""
    address, seen, status = fake_dashboard
    status[0] = 403
    result = _submit(
        ["--address", address, "--", "run", "experiments/quickstart.yaml"],
        clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=SENTINEL),
        timeout=60,
    )
    assert result.returncode == 2
    assert "answered 403" in result.stderr
    assert seen and seen[0]["authorization"] == f"Bearer {SENTINEL}"
    assert SENTINEL not in result.stdout + result.stderr


def test_token_from_the_home_token_file_is_sent_and_never_shown(fake_dashboard, tmp_path: Path) -> None:
    """RAY_AUTH_TOKEN unset: Ray's helper reads ~/.ray/auth_token; the probe and the submission both send it,
    and the dashboard's error, which echoes it, is printed masked."""
    address, seen, _ = fake_dashboard
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(SENTINEL + "\n")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "launch.py").write_text("print('never runs')\n")
    result = _submit(
        ["--address", address, "--working-dir", str(tmp_path / "repo"), "--", "run", "x.yaml"],
        clean_env(RAY_AUTH_MODE="token", HOME=str(tmp_path)),
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert {(r["method"], r["path"], r.get("authorization")) for r in seen} >= {
        ("GET", "/api/version", f"Bearer {SENTINEL}"),
        ("POST", "/api/jobs/", f"Bearer {SENTINEL}"),
    }
    assert "did not accept the job" in result.stderr and '"authorization": "***"' in result.stderr
    assert SENTINEL not in result.stdout + result.stderr


def test_token_mode_without_a_token_is_a_clear_error(tmp_path: Path) -> None:
    result = _submit(
        ["--address", "http://127.0.0.1:8265", "--", "run", "experiments/quickstart.yaml"],
        clean_env(RAY_AUTH_MODE="token", HOME=str(tmp_path)),
        timeout=60,
    )
    assert result.returncode == 2
    assert "RAY_AUTH_MODE=token but Ray found no token" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_refused_submission_exits_2_without_a_traceback(fake_dashboard, tmp_path: Path) -> None:
    """The dashboard answers the probe, then refuses the job itself (here: HTTP 500 on POST /api/jobs/)."""
    address, seen, _ = fake_dashboard
    (tmp_path / "launch.py").write_text("print('never runs')\n")
    result = _submit(
        ["--address", address, "--working-dir", str(tmp_path), "--", "run", "x.yaml"],
        clean_env(RAY_AUTH_MODE="disabled"),
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"error: the cluster at {address} did not accept the job" in result.stderr
    assert "Traceback" not in result.stderr
    assert ("POST", "/api/jobs/") in {(r["method"], r["path"]) for r in seen}


@pytest.fixture
def package_catcher() -> Iterator[tuple[str, list[bytes]]]:
    """A dashboard that answers the version probe, has no package yet (GET /api/packages/... 404), keeps the
    package the Job SDK then uploads (PUT), and refuses the job itself (POST 500): what Ray would really upload."""
    packages: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, code: int, body: bytes = b"{}") -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(404) if self.path.startswith("/api/packages/") else self._answer(
                200, b'{"ray_version": "2.60.0"}'
            )

        def do_PUT(self) -> None:
            packages.append(self.rfile.read(int(self.headers["Content-Length"])))
            self._answer(200)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._answer(500)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", packages
    server.shutdown()
    server.server_close()


def test_the_package_ray_uploads_holds_the_code_and_no_secret(package_catcher, tmp_path: Path) -> None:
    """`submit` end to end: the Job SDK's real zip of the working dir, and what `submit` printed about it."""
    address, packages = package_catcher
    working_dir = _working_dir(tmp_path / "repo")
    result = _submit(
        ["--address", address, "--working-dir", str(working_dir), "--", "run", "x.yaml"],
        clean_env(RAY_AUTH_MODE="disabled"),
        timeout=120,
    )
    assert result.returncode == 2, result.stderr  # the fake dashboard refuses the job once it has the package
    assert len(packages) == 1, result.stderr
    with zipfile.ZipFile(io.BytesIO(packages[0])) as package:
        files = sorted(name for name in package.namelist() if not name.endswith("/"))
    assert files == sorted(KEPT_FILES)
    assert (
        f"upload: left out {len(SECRETS_SHOWN)} path(s) that look like secrets (never uploaded): "
        f"{', '.join(SECRETS_SHOWN)}" in result.stdout
    )
    assert "upload: left out 4 other path(s)" in result.stdout
    assert SECRET_TEXT not in result.stdout + result.stderr


@pytest.mark.skipif(
    "add_submit_parser" not in (REPO / "launch.py").read_text(), reason="launch.py does not wire `submit` yet"
)
def test_launch_py_submit_is_wired() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "submit",
            "--address",
            address,
            "--",
            "run",
            "experiments/quickstart.yaml",
            "train.epochs=1",
        ],
        check=False,
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert f"no Ray dashboard answered at {address}" in result.stderr
